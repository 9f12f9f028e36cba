"""Verification: which draft nodes the target accepts, and the target's own next token.

Greedy: walk from the root, following the child whose token is the target's argmax.
Sampling: multi-candidate recursive rejection sampling (SpecInfer / EAGLE, the without-replacement
form of Jeon et al.). At a node with children c1..cm drawn in order from proposal q:
accept c_i with probability min(1, r(c_i) / q_i(c_i)); on rejection r <- norm(max(r - q_i, 0)) and
q_{i+1} = q_i with c_i removed. Deterministic proposals (q = None) are point masses: accept with
probability r(c_i), else zero c_i out of r. If no child is accepted the next token is drawn from r.
Each committed token is then distributed exactly as the target's own sample.

`score` reduces the target's logits where they are (argmax per row, p and q of each drafted token)
so that `verify` runs on a few host numbers per node; full rows cross to the host only for the
residual after a rejected sample.

`token_probs` is the one place logits become sampling probabilities (temperature, top-p); drafters
use it too (through `draft_probs`), so that draft and target are warped the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmspec.kvcache import to_device
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


@dataclass
class Scores:
    """What verification reads of the target's logits, reduced where the logits are.

    Only `packed` (argmax per row | p of each node's token | q of each node's token) crosses to
    the host, in one copy, instead of [1 + n, V] logits: a full-vocabulary row per node is copied
    only when a sampled node is rejected and its residual distribution is needed."""

    probs: torch.Tensor | None  # [1 + n, V] target sampling distribution rows (None when greedy)
    packed: torch.Tensor  # [(1 + n) + 2n] float64: top | p at node token | q at node token (nan: point mass)


def score(target_logits: torch.Tensor, tokens: torch.Tensor, parents: list[int], sampling: Sampling,
          proposals: dict[int, torch.Tensor | None]) -> Scores:
    """tokens [1 + n]: root then node tokens (host or device). No host sync: launched right after
    the target's forward, this is queued behind it while the host goes on."""
    dev = target_logits.device
    logits = target_logits.float()
    probs = None if sampling.greedy else token_probs(logits, sampling)
    n = len(parents)
    parts = [logits.argmax(-1).double()]
    if n:
        rows = to_device(torch.tensor([p + 1 for p in parents]), dev)
        toks = (tokens if tokens.device == dev else to_device(tokens, dev))[1:]
        src = probs if probs is not None else torch.softmax(logits, -1)  # greedy: plain softmax, for the trace
        parts.append(src[rows, toks].double())
        q_at = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
        have = [i for i, p in enumerate(parents) if proposals.get(p) is not None]
        if have and not sampling.greedy:  # greedy verification never reads q
            idx = to_device(torch.tensor(have), dev)
            q_rows = torch.stack([proposals[parents[i]].to(dev) for i in have])
            q_at.index_copy_(0, idx, q_rows.gather(1, toks[idx].unsqueeze(1)).squeeze(1).double())
        parts.append(q_at)
    return Scores(probs, torch.cat(parts))


def _draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=gen).item())


def verify(
    tree: DraftTree,
    target_logits: torch.Tensor,  # [1 + n, V]: row 0 = root, row i + 1 = node i
    sampling: Sampling,
    proposals: dict[int, torch.Tensor | None],
    gen: torch.Generator,
    scores: Scores | None = None,  # from `score` (the engine launches it before the step's sync)
) -> Verdict:
    if scores is None:
        tokens = torch.tensor([0] + tree.tokens, dtype=torch.long)
        scores = score(target_logits, tokens, tree.parents, sampling, proposals)
    n, Q = len(tree), target_logits.shape[0]
    host = scores.packed.tolist()  # the one host sync of a step's verification
    top = [int(t) for t in host[:Q]]
    target_probs, q_at = host[Q : Q + n], host[Q + n :]
    target_tokens = [top[p + 1] for p in tree.parents]
    children = tree.children()
    accepted: list[int] = []
    node = -1
    if sampling.greedy:
        while True:
            want = top[node + 1]
            nxt = next((c for c in children.get(node, []) if tree.tokens[c] == want), None)
            if nxt is None:
                return Verdict(accepted, want, target_tokens, target_probs)
            accepted.append(nxt)
            node = nxt
    # One uniform per node, drawn at once: each node is tested at most once, as its parent's child.
    uniforms = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    while True:
        # Until a child is rejected (r is None), an acceptance test needs only the two scalars
        # already on the host; the rows r and q are copied at the first rejection.
        r = q = None
        for c in children.get(node, []):
            x = tree.tokens[c]
            u = uniforms[c]
            if r is None:
                rx, qx = target_probs[c], q_at[c]
                point_mass = proposals.get(node) is None
            else:
                rx, qx, point_mass = float(r[x]), (float(q[x]) if q is not None else 0.0), q is None
            if point_mass:
                if u < rx:
                    nxt = c
                    break
            elif qx > 0 and u < min(1.0, rx / qx):
                nxt = c
                break
            if r is None:
                r = scores.probs[node + 1].double().cpu().clone()
                q = None if point_mass else proposals[node].double().cpu().clone()
            if q is None:
                r[x] = 0.0
            else:
                residual = (r - q).clamp_min(0.0)
                # r == q would have accepted surely; a zero residual is rounding, keep r.
                r = residual if residual.sum() > 1e-12 else r
                q[x] = 0.0
                if q.sum() <= 0:
                    q = None
                else:
                    q = q / q.sum()
            r = r / r.sum()
        else:
            nxt = None
        if nxt is None:
            if r is None:
                r = scores.probs[node + 1].cpu()
            return Verdict(accepted, _draw(r.float(), gen), target_tokens, target_probs)
        accepted.append(nxt)
        node = nxt
