"""Drafters: what proposes tokens for the target to verify. One module per drafter, one registry.

- `base`: the interface (`Drafter`: start / observe / propose / finish) and `DraftContext`, what the
  engine hands a drafter per prompt.
- `model`: `ModelDrafter`, an independent Hugging Face model with the target's tokenizer (a small
  VLM that sees the image, or a text-only LM that does not), with its own KV cache.
- `ngram`: `NgramDrafter`, prompt lookup.
- `noise`: `RandomDrafter`, a deliberately bad drafter for tests and lessons.
- `feature/`: EAGLE-family feature drafters that read the target's hidden states (network,
  visual-token plan, save / load, calibration, the engine-facing drafter; see its docstring).
- `eagle3_head`: EAGLE-3 heads in the vLLM / SGLang / SpecForge format (load, draft, export);
  mmspec's own EAGLE-3 drafter, assets/models/mmspec-feat-eagle3, is one.
- `registry`: one row per drafter kind (how a spec is recognised and loaded, its label, whether it
  needs a model, its shipped instances) and `load_drafter`; the CLI, the app and bench/speed.py read
  it. Adding a drafter is one module here and one row there.

Nothing is re-exported here: import from the module that holds a name (the common ones are also
in `mmspec`'s top level: `from mmspec import Drafter, load_drafter`).
"""
