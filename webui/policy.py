"""Public mode: what a visitor of a public deployment (a Hugging Face Space) may ask for.

On when the environment has SPACE_ID (set by Spaces) or MMSPEC_PUBLIC=1. Then targets and drafters
come only from a configured list (the embedded models plus curated hub pairs), every limit is the
tighter public one, and a model path or hub id typed into a request is refused on the server, not
only by the page's dropdowns.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from mmspec.drafters import registry
from mmspec.errors import InputError
from viz.schema import TraceLimits

ALWAYS_DRAFTERS = registry.model_free_names()  # fine with any target
# Curated hub pairs offered in public mode besides the embedded models: target -> its drafters.
# (Same tokenizer family; downloaded on first use in a Space. MMSPEC_PUBLIC_PAIRS replaces the list:
# "target=drafter1|drafter2;target2=drafter3".)
CURATED_PAIRS: dict[str, tuple[str, ...]] = {
    "Qwen/Qwen2-VL-2B-Instruct": ("Qwen/Qwen2-0.5B-Instruct",),
    # one tokenizer across the Qwen2.5-VL family: the 3B drafts for the 7B, image and all
    "Qwen/Qwen2.5-VL-7B-Instruct": ("Qwen/Qwen2.5-VL-3B-Instruct",),
    # the SmolVLM2 release shares one tokenizer (49,280 ids) and vision encoder between its 500M and 256M
    "HuggingFaceTB/SmolVLM2-500M-Video-Instruct": ("HuggingFaceTB/SmolVLM2-256M-Video-Instruct",),
}


def public_mode(env: Mapping[str, str] = os.environ) -> bool:
    return bool(env.get("SPACE_ID")) or env.get("MMSPEC_PUBLIC", "").strip() == "1"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; public mode uses `Limits.public()`."""
    max_prompt_chars: int = 2000
    max_new_tokens: int = 512
    max_image_bytes: int = 32 * 2**20
    max_image_pixels: int = 64_000_000  # larger images are refused before decoding; up to this, downscaled
    trace: TraceLimits = field(default_factory=TraceLimits)
    queue_size: int = 20
    replays_per_minute: int = 30  # replays, step inspections, trace loads, stops: per session
    max_sessions: int = 2000  # sessions whose per-session bookkeeping is kept at once

    @classmethod
    def public(cls, max_new_tokens: int = 256) -> "Limits":
        return cls(max_prompt_chars=500, max_new_tokens=max_new_tokens, max_image_bytes=8 * 2**20,
                   max_image_pixels=16_000_000,
                   trace=TraceLimits(max_bytes=8 * 2**20, max_steps=1024, max_total_nodes=100_000),
                   queue_size=16, replays_per_minute=20, max_sessions=500)


def parse_pairs(text: str) -> dict[str, tuple[str, ...]]:
    """'target=d1|d2;target2=d3' -> {target: (d1, d2), target2: (d3,)}."""
    out: dict[str, tuple[str, ...]] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        target, _, drafters = entry.partition("=")
        out[target.strip()] = tuple(d.strip() for d in drafters.split("|") if d.strip())
    return out


@dataclass(frozen=True)
class Policy:
    """Which (target, drafter) pairs a request may name; `public=False` allows any."""
    public: bool
    pairs: Mapping[str, tuple[str, ...]]  # target -> drafters allowed with it (model-free ones always)

    @property
    def targets(self) -> list[str]:
        return list(self.pairs)

    def drafters(self) -> list[str]:
        seen = dict.fromkeys(d for ds in self.pairs.values() for d in ds)
        return list(seen) + [d for d in ALWAYS_DRAFTERS if d not in seen]

    def check(self, target: str, drafter: str) -> None:
        if not self.public:
            return
        if target not in self.pairs:
            raise InputError("This public app runs only the targets in its list; a typed model path or hub id "
                             "is not accepted here (run the app locally for any model).")
        if drafter not in ALWAYS_DRAFTERS and drafter not in self.pairs[target]:
            raise InputError("This public app runs only the drafters listed for the chosen target; a typed model "
                             "path or hub id is not accepted here (run the app locally for any model).")


def make_policy(public: bool, default_target: str, default_drafters: list[str],
                env: Mapping[str, str] = os.environ) -> Policy:
    """The embedded target with the app's drafter list, plus the curated hub pairs."""
    pairs = {default_target: tuple(d for d in default_drafters if d not in ALWAYS_DRAFTERS)}
    curated = parse_pairs(env["MMSPEC_PUBLIC_PAIRS"]) if "MMSPEC_PUBLIC_PAIRS" in env else CURATED_PAIRS
    for target, drafters in curated.items():
        pairs.setdefault(target, ())
        pairs[target] = tuple(dict.fromkeys(pairs[target] + drafters))
    return Policy(public, pairs)
