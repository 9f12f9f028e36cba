"""The default drafter and tree shape: the fastest method measured on a GPU, as `bench/speed.py
--write-default` recorded it in `assets/default_method.json`.

    {"drafter": "mmspec-feat-eagle3" (a directory under assets/models, or ngram / random),
     "tree": "dynamic:24,5,4", "measured": {"device": ..., "speedup_t0": ..., "speedup_t1": ..., ...}}

Without the file (or with a drafter that is not shipped) the default is the n-gram drafter with a
4-token chain: it needs no model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmspec.load import ASSETS

DEFAULT_FILE = ASSETS / "default_method.json"
MODELS = ASSETS / "models"
BUILTIN = ("ngram", "random")
FALLBACK = ("ngram", "chain:4")


@dataclass(frozen=True)
class DefaultMethod:
    drafter: str  # a path under assets/models, or a built-in drafter name
    tree: str
    measured: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def default_method(path: Path = DEFAULT_FILE) -> DefaultMethod:
    try:
        raw = json.loads(Path(path).read_text())
        name, tree = str(raw["drafter"]), str(raw["tree"])
    except (OSError, ValueError, KeyError, TypeError):
        return DefaultMethod(*FALLBACK)
    if name in BUILTIN:
        return DefaultMethod(name, tree, raw.get("measured") or {})
    # Only a shipped drafter, never a path taken from the file.
    where = shipped_drafter(name)
    return DefaultMethod(str(where), tree, raw.get("measured") or {}) if where else DefaultMethod(*FALLBACK)


def shipped_drafter(name: str) -> Path | None:
    """The folder under assets/models of a drafter named as bench/speed.py names it (without the
    "mmspec-" prefix) or as its folder is named; None when none is shipped."""
    base = Path(name).name
    return next((where for where in (MODELS / base, MODELS / f"mmspec-{base}") if where.is_dir()), None)


def pick_fastest(rows: list[dict], meta: dict) -> dict | None:
    """The engine method (drafter, tree) with the highest median speed-up at T=0 among those whose
    greedy output equals vanilla's on every prompt; its T=1 speed-up is recorded beside it."""
    ok = [r for r in rows if r.get("method", "").startswith("engine:") and r["method"].count(":") >= 2
          and not r["method"].endswith(":eager") and r.get("temperature") == 0 and not r.get("error")
          and r.get("lossless") and r.get("speedup")]
    if not ok:
        return None
    best = max(ok, key=lambda r: r["speedup"])
    _, drafter, tree = best["method"].split(":", 2)
    t1 = [r for r in rows if r.get("method") == best["method"] and r.get("temperature") == 1 and r.get("speedup")]
    return {"drafter": drafter, "tree": tree, "measured": {
        "device": meta.get("hardware") or meta.get("device"), "dtype": meta.get("dtype"),
        "prompts": meta.get("n"), "speedup_t0": round(best["speedup"], 3), "tau_t0": best.get("tau"),
        "speedup_t1": round(t1[0]["speedup"], 3) if t1 else None, "candidates": len(ok)}}
