"""NgramDrafter: prompt lookup; proposes continuations of earlier occurrences of the current suffix
in the prompt (media tokens left out) and the output so far. Needs no model."""
from __future__ import annotations

from collections import Counter

from mmspec.drafters.base import DraftContext, Drafter
from mmspec.tree import Proposal, tree_from_paths


class NgramDrafter(Drafter):
    """Prompt lookup: find the current suffix earlier in prompt + output, propose what followed."""

    kind = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.name = "ngram"
        self.max_n, self.min_n = max_n, min_n
        self.prompt_ids: list[int] = []

    def info(self):
        return {"name": self.name, "kind": self.kind, "max_n": self.max_n, "min_n": self.min_n}

    def start(self, ctx: DraftContext) -> None:
        media = ctx.target.family.media_token_ids(ctx.target.model.config)
        self.prompt_ids = [t for t in ctx.prompt_ids if t not in media]

    def propose(self, committed, spec, sampling, gen):
        seq = self.prompt_ids + committed
        for n in range(min(self.max_n, len(seq) - 1), self.min_n - 1, -1):
            suffix = seq[-n:]
            found: Counter[tuple[int, ...]] = Counter()
            for i in range(len(seq) - n - 1, -1, -1):
                if seq[i : i + n] == suffix:
                    cont = tuple(seq[i + n : i + n + spec.depth])
                    if cont:
                        found[cont] += 1
            if found:
                conts = [(list(c), float(w)) for c, w in found.most_common()]
                return Proposal(tree_from_paths(conts, spec), {})
        return Proposal(tree_from_paths([], spec), {})
