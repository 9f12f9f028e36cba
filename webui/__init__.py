"""Gradio-free services the app wires (see ARCHITECTURE.md): request parsing and limits (request.py),
the public-mode policy (policy.py), and per-session bookkeeping and the model cache (session.py)."""
