"""Crafted traces for the app's safety tests: a real race from the tiny models, then broken or
poisoned copies of it (shared by test_trace_schema.py, test_app.py, test_public.py, test_browser.py)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import tiny_models
from mmspec import DecodeConfig, generate, load_drafter, load_target
from viz import traceio

PROMPT = "Describe the image."
# Each sets a window flag if it ever runs; the browser test checks the flag stays unset.
PAYLOADS = ('<img src=x onerror="window.__mmspec_xss=1">', "<script>window.__mmspec_xss=1</script>",
            '"><svg onload="window.__mmspec_xss=1">')
# String fields whose value is one of a few words: a payload there is refused, not rendered.
CHOICE_FIELDS = {"format", "mode", "kind", "next_kind", "status", "image"}


def real_race(tiny_dir: Path, max_new_tokens: int = 16) -> dict:
    """A packed race (vanilla + speculative with a random drafter: rejections and corrections)."""
    target = load_target(str(tiny_dir / "llava"))
    img = tiny_models.image(0)
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, tree="dynamic:8,3,2")
    van = generate(target, None, img, PROMPT, cfg)
    spec = generate(target, load_drafter("random", target), img, PROMPT, cfg)
    spec.steps[1].extras = {"visual_map": {"grid": [2, 3], "status": ["kept", "merged", "dropped"] * 2, "mode": "m"}}
    spec.drafter_info = {"name": "random", "entropy_profile": [1.0, 0.5, 0.2], "chosen_layers": [1], "note": "x"}
    return traceio.pack(traceio.Bundle(van, spec, img, {5: "five"}))


def diverged(race: dict) -> dict:
    """A copy whose speculative output differs from vanilla's at its last token (the diff view draws)."""
    out = copy.deepcopy(race)
    spec = out["speculative"]
    last = next(s for s in reversed(spec["steps"]) if s["new_tokens"])
    new = (last["new_tokens"][-1] + 1) % 300
    last["new_tokens"][-1] = spec["token_ids"][-1] = new
    return out


def poisoned(race: dict, payload: str) -> dict:
    """A copy with `payload` put into every free-text string and free-form key (iteratively)."""
    out = copy.deepcopy(race)
    stack = [(out, "")]
    while stack:
        node, key = stack.pop()
        items = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        for k, v in items:
            if isinstance(v, (dict, list)):
                stack.append((v, k if isinstance(k, str) else key))
            elif isinstance(v, str) and (k if isinstance(k, str) else key) not in CHOICE_FIELDS:
                node[k] = payload + v
    for free in ("config", "drafter_info"):  # keys of free-form objects are shown too
        for mode in ("vanilla", "speculative"):
            out[mode][free][payload] = payload
    return out


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path
