"""The drafter interface every drafter implements, and what the engine hands a drafter per prompt.

Every drafter has `start(ctx)` (once per prompt, after the target's prefill) and
`propose(committed, spec, sampling, gen) -> Proposal`. Drafters with a next-token distribution
hand an `expand` function to `tree.grow_tree`, which owns the chain/static/dynamic shapes.
The drafters themselves live beside this module, one file each (see `mmspec.drafters`), and
`mmspec.drafters.registry` says how a `--drafter` name finds one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from mmspec.tree import Proposal, TreeSpec
from mmspec.verify import Sampling


@dataclass
class DraftContext:
    image: Image.Image | None
    prompt: str
    prompt_ids: list[int]  # the target's prefill ids, image tokens expanded
    target: Any  # mmspec.load.Target
    target_cache: Any = None  # the target's CachedModel (AASD-style drafters read its KV cache)
    target_hidden: torch.Tensor | None = None  # [len(target_layers), prompt_len, H] prefill features
    cache_room: int | None = None  # the engine's fast path: static caches with this room after the prompt
    cuda_graphs: bool = False
    target_inputs: dict[str, torch.Tensor] | None = None  # the processor's output the target prefilled with


class Drafter:
    name = "drafter"
    kind = "base"
    # Indices into the target's `hidden_states` tuple (0 = embeddings, -1 = last layer) that this
    # drafter reads; empty = none, and the target then runs without returning hidden states.
    target_layers: tuple[int, ...] = ()

    def start(self, ctx: DraftContext) -> None:
        pass

    def finish(self) -> None:
        """After the last step (also when a decode is stopped or fails): give back what start took."""

    def observe(self, target_hidden: torch.Tensor, tokens: list[int]) -> None:
        """After each verify: target features [len(target_layers), k, H] at the k positions just
        committed to the target cache (the step's root, then the accepted nodes), and their tokens."""

    def propose(self, committed: list[int], spec: TreeSpec, sampling: Sampling, gen: torch.Generator) -> Proposal:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind}
