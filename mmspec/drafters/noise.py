"""RandomDrafter: proposes tokens from random distributions, a deliberately bad drafter for tests
and lessons (almost always rejected, still lossless)."""
from __future__ import annotations

import torch

from mmspec.drafters.base import Drafter
from mmspec.tree import grow_tree
from mmspec.verify import draft_probs


class RandomDrafter(Drafter):
    """Proposes tokens from random distributions: almost always rejected, still lossless."""

    kind = "random"

    def __init__(self, vocab_size: int, seed: int = 0):
        self.name = "random"
        self.vocab_size = vocab_size
        self.rng = torch.Generator().manual_seed(seed)

    def propose(self, committed, spec, sampling, gen):
        def expand(pool, ids):
            logits = torch.randn(len(ids), self.vocab_size, generator=self.rng) * 3.0
            return draft_probs(logits, sampling)

        return grow_tree(expand, spec, not sampling.greedy, gen)
