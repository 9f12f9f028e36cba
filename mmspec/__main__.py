"""`python -m mmspec generate ...`: the command-line contract (see README)."""
from mmspec.cli import main

raise SystemExit(main())
