"""Verification: which draft nodes the target accepts, and the target's own next token.

Greedy: walk from the root, following the child whose token is the target's argmax.
Sampling: multi-candidate recursive rejection sampling (SpecInfer / EAGLE, the without-replacement
form of Jeon et al.). At a node with children c1..cm drawn in order from proposal q:
accept c_i with probability min(1, r(c_i) / q_i(c_i)); on rejection r <- norm(max(r - q_i, 0)) and
q_{i+1} = q_i with c_i removed. Deterministic proposals (q = None) are point masses: accept with
probability r(c_i), else zero c_i out of r. If no child is accepted the next token is drawn from r.
Each committed token is then distributed exactly as the target's own sample.

`token_probs` is the one place logits become sampling probabilities (temperature, top-p); drafters
use it too (through `draft_probs`), so that draft and target are warped the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmspec.trace import DraftTree


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def token_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Sampling distribution over the last dim. Greedy gives the one-hot of the argmax."""
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token is always kept).
        drop = sorted_p.cumsum(-1) - sorted_p >= sampling.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draft_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """A drafter's q: its sampling distribution, or plain softmax for ranking when greedy."""
    return torch.softmax(logits.float(), -1) if sampling.greedy else token_probs(logits, sampling)


def gumbel_scores(logq: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """log q + Gumbel noise from uniform draws: the order of the scores is a sequence of draws from q
    without replacement (its argmax is one sample), on whatever device the inputs are."""
    return logq - torch.log(-torch.log(uniform.clamp_min(1e-20)))


@dataclass
class Verdict:
    accepted: list[int]  # node indices, root to leaf
    next_token: int
    target_tokens: list[int]  # target argmax at each node's parent context
    target_probs: list[float]  # target sampling prob of each node's token


def _draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=gen).item())


def verify(
    tree: DraftTree,
    target_logits: torch.Tensor,  # [1 + n, V]: row 0 = root, row i + 1 = node i
    sampling: Sampling,
    proposals: dict[int, torch.Tensor | None],
    gen: torch.Generator,
) -> Verdict:
    logits = target_logits.float().cpu()  # the one host sync of a step
    top = logits.argmax(-1)
    parent_rows = torch.tensor([p + 1 for p in tree.parents], dtype=torch.long)
    toks = torch.tensor(tree.tokens, dtype=torch.long)
    probs_rows = token_probs(logits, sampling) if not sampling.greedy else None
    if len(tree):
        target_tokens = top[parent_rows].tolist()
        p_src = probs_rows if probs_rows is not None else torch.softmax(logits, -1)
        target_probs = p_src[parent_rows, toks].tolist()
    else:
        target_tokens, target_probs = [], []
    children = tree.children()
    accepted: list[int] = []
    node = -1
    if sampling.greedy:
        while True:
            want = int(top[node + 1])
            nxt = next((c for c in children.get(node, []) if tree.tokens[c] == want), None)
            if nxt is None:
                return Verdict(accepted, want, target_tokens, target_probs)
            accepted.append(nxt)
            node = nxt
    while True:
        r = probs_rows[node + 1].double().clone()
        q = proposals.get(node)
        q = q.double().cpu().clone() if q is not None else None
        nxt = None
        for c in children.get(node, []):
            x = tree.tokens[c]
            u = torch.rand((), generator=gen, dtype=torch.float64).item()
            if q is None:
                if u < r[x]:
                    nxt = c
                    break
                r[x] = 0.0
            else:
                if q[x] > 0 and u < min(1.0, float(r[x] / q[x])):
                    nxt = c
                    break
                residual = (r - q).clamp_min(0.0)
                # r == q would have accepted surely; a zero residual is rounding, keep r.
                r = residual if residual.sum() > 1e-12 else r
                q[x] = 0.0
                if q.sum() <= 0:
                    q = None
                else:
                    q = q / q.sum()
            r = r / r.sum()
        if nxt is None:
            return Verdict(accepted, _draw(r.float(), gen), target_tokens, target_probs)
        accepted.append(nxt)
        node = nxt
