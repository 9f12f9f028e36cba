"""Drafting on the device: EAGLE-2 dynamic trees grown with fixed sizes (no host round trip per
level), the pieces every device chain shares (`draw`, `chain_proposal`) and the choice between
device drafting and host-grown trees (`propose`).

The same tree as `tree.grow_tree` for `dynamic:BUDGET,DEPTH,TOPK` (same ranking keys, same
stable tie-breaks by pool index, children chosen as top-k or Gumbel-top-k of the drafter's q, so
kept as a prefix of their draw order), computed with tensors of fixed shape so that a drafter can
capture the whole growth in one CUDA graph:
- the pool holds TOPK level-1 nodes, then TOPK x TOPK candidates per further level, in the order
  grow_tree adds them; a candidate whose q is 0 is marked invalid instead of left out;
- each level's frontier (the TOPK best new candidates) is fed at fixed cache rows
  row0 + (level - 1) * TOPK + j and sees the committed rows and its ancestors' rows;
- the BUDGET best valid pool nodes are kept. `to_proposal` then reads the kept nodes in one
  device-to-host copy and builds the `Proposal` the engine verifies.
The drafter supplies `expand(depth, tokens, feeds, rows, allowed) -> (q [K, V], child_feeds [K, ...])`:
feed the frontier nodes of that depth (token, and whatever the drafter pairs with it: a feature
drafter's predicting feature) at cache rows `rows` with attention `allowed` [K, cap], and return their
next-token distributions and what their children will be fed with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mmspec.graphs import run_body
from mmspec.trace import DraftTree
from mmspec.tree import NO_TREE, Proposal, TreeSpec, grow_tree
from mmspec.verify import gumbel_scores

Expand = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DeviceTree:
    tokens: torch.Tensor  # [N] pool tokens
    parents: torch.Tensor  # [N] pool index of the parent (-1 = root)
    q: torch.Tensor  # [N] drafter q of each token
    kept: torch.Tensor  # [B] pool indices of the kept nodes: valid ones first, in pool order
    n_kept: torch.Tensor  # () how many of `kept` are valid
    expanded: torch.Tensor  # [DEPTH - 1, K] pool index of each level's frontier
    q_rows: torch.Tensor  # [1 + (DEPTH - 1) * K, V] q of the root, then of each frontier node


def pool_size(spec: TreeSpec) -> int:
    return spec.topk + (spec.depth - 1) * spec.topk * spec.topk


def tree_rows(spec: TreeSpec) -> int:
    """Cache rows the growth writes after row0."""
    return (spec.depth - 1) * spec.topk


def _children(q: torch.Tensor, k: int, noise: torch.Tensor | None):
    """Top-k (or Gumbel-top-k with uniforms `noise` [R, V]) children of each row of q [R, V]."""
    logq = q.log()
    scores = logq if noise is None else gumbel_scores(logq, noise)
    top = torch.topk(scores, k, dim=-1)
    cq = q.gather(-1, top.indices)
    return top.indices, cq, top.values, cq > 0


def _best(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest keys, ties to the lower index, returned in index order."""
    return torch.sort(keys, descending=True, stable=True).indices[:n].sort().values


def grow(expand: Expand, root_q: torch.Tensor, root_feed: torch.Tensor, spec: TreeSpec, row0: torch.Tensor,
         cols: torch.Tensor, noise: torch.Tensor | None) -> DeviceTree:
    """root_q [V]: q after the root; root_feed: what the root's children are fed with; row0: first
    free cache row (device scalar); cols: arange over the drafter's cache; noise [DEPTH, K, V]
    uniforms when sampling (None: greedy)."""
    K, D, dev = spec.topk, spec.depth, root_q.device
    W = max(tree_rows(spec), 1)
    tok, q, s, ok = _children(root_q[None], K, None if noise is None else noise[0, :1])
    new_idx = torch.arange(K, device=dev)
    new = {"tok": tok[0], "key": torch.clamp(s[0], max=0.0), "ok": ok[0], "feed": root_feed.expand(K, *root_feed.shape),
           "anc": torch.zeros(K, W, dtype=torch.bool, device=dev)}
    new["key"] = new["key"].masked_fill(~new["ok"], float("-inf"))
    pool = {"tok": [new["tok"]], "par": [torch.full((K,), -1, device=dev)], "q": [q[0]], "key": [new["key"]],
            "ok": [new["ok"]]}
    q_rows, expanded, size = [root_q[None]], [], K
    rel = (cols - row0)[None]
    slot = torch.arange(K, device=dev)
    for d in range(1, D):
        sel = _best(new["key"], K)
        f_idx, f_key, f_ok = new_idx[sel], new["key"][sel], new["ok"][sel]
        anc = new["anc"][sel].scatter(1, ((d - 1) * K + slot)[:, None], True)
        allowed = (rel < 0) | (anc.gather(1, rel.clamp(0, W - 1).expand(K, -1)) & (rel < W))
        fq, child_feed = expand(d, new["tok"][sel], new["feed"][sel], row0 + (d - 1) * K + slot, allowed)
        q_rows.append(fq)
        expanded.append(f_idx)
        ctok, cq, cs, cok = _children(fq, K, None if noise is None else noise[d])
        cok = cok & f_ok[:, None]
        ckey = torch.minimum(f_key[:, None], f_key[:, None] + cs).masked_fill(~cok, float("-inf"))
        new_idx = size + torch.arange(K * K, device=dev)
        new = {"tok": ctok.reshape(-1), "key": ckey.reshape(-1), "ok": cok.reshape(-1),
               "feed": child_feed.repeat_interleave(K, 0), "anc": anc.repeat_interleave(K, 0)}
        for name, value in (("tok", new["tok"]), ("par", f_idx.repeat_interleave(K)), ("q", cq.reshape(-1)),
                            ("key", new["key"]), ("ok", new["ok"])):
            pool[name].append(value)
        size += K * K
    keys, valid = torch.cat(pool["key"]), torch.cat(pool["ok"])
    kept = _best(keys, min(spec.budget, size))
    # Invalid nodes (q = 0) can only be kept when fewer valid ones exist: move them to the end.
    kept = kept[torch.sort((~valid[kept]).long(), stable=True).indices]
    return DeviceTree(torch.cat(pool["tok"]), torch.cat(pool["par"]), torch.cat(pool["q"]), kept, valid[kept].sum(),
                      torch.stack(expanded) if expanded else torch.zeros(0, K, dtype=torch.long, device=dev),
                      torch.cat(q_rows))


def to_proposal(t: DeviceTree, spec: TreeSpec) -> Proposal:
    """The kept nodes as a host `DraftTree` (one device-to-host copy) and the q rows of every
    expanded kept node (root: -1) as its proposals, as `tree.grow_tree` returns them."""
    K = spec.topk
    ints = torch.cat([t.kept, t.n_kept.view(1), t.tokens, t.parents, t.expanded.reshape(-1)]).double()
    host = torch.cat([ints, t.q.double()]).tolist()
    B, N = t.kept.shape[0], t.tokens.shape[0]
    n = int(host[B])
    kept = [int(i) for i in host[:n]]
    tokens, parents = host[B + 1 : B + 1 + N], host[B + 1 + N : B + 1 + 2 * N]
    expanded = [int(i) for i in host[B + 1 + 2 * N : B + 1 + 2 * N + t.expanded.numel()]]
    q = host[B + 1 + 2 * N + t.expanded.numel() :]
    depth = [1 if i < K else 2 + (i - K) // (K * K) for i in range(N)]
    new_index = {-1: -1, **{p: j for j, p in enumerate(kept)}}
    tree = DraftTree(tokens=[int(tokens[p]) for p in kept], parents=[new_index[int(parents[p])] for p in kept],
                     depths=[depth[p] for p in kept], draft_probs=[q[p] for p in kept])
    proposals = {-1: t.q_rows[0]}
    for row, p in enumerate(expanded, start=1):
        if p in new_index:
            proposals[new_index[p]] = t.q_rows[row]
    return Proposal(tree, proposals)


def draw(q: torch.Tensor, uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One chain token from q [V] on the device: the argmax of log q (greedy) or of log q plus
    Gumbel noise from `uniform` [V] (a sample from q). Returns the token [1] and its q [1]."""
    score = q if uniform is None else gumbel_scores(q.log(), uniform)  # greedy: log is monotone, skip it
    token = score.argmax().view(1)
    return token, q.gather(0, token)


def chain_proposal(tokens: torch.Tensor, probs: torch.Tensor, q_rows: torch.Tensor) -> Proposal:
    """A chain drafted on the device: its tokens stay there for verification (`Proposal.resolve`
    fills the host tree afterwards); node d - 1's children are drawn from q_rows[d]."""
    depth = q_rows.shape[0]
    tree = DraftTree(tokens=[0] * depth, parents=list(range(-1, depth - 1)), depths=list(range(1, depth + 1)),
                     draft_probs=[0.0] * depth)
    return Proposal(tree, {d - 1: q_rows[d] for d in range(depth)}, device_tokens=tokens, device_probs=probs)


def pending(prompt_ids: list[int], committed: list[int], n_feat: int, what: str) -> tuple[list[int], int]:
    """A feature-reading drafter's view at propose: the whole sequence and the last position with
    target features (upto), checked against the features it was handed (n_feat)."""
    seq = list(prompt_ids) + list(committed)
    if n_feat != len(seq) - 1:
        raise RuntimeError(f"{what} out of sync: {n_feat} features for {len(seq)} tokens")
    return seq, len(seq) - 2


def step_rows(spec: TreeSpec, k: int) -> int:
    """Cache rows one device step writes past the committed ones: k fed entries, then the drafted
    nodes (the tree's pool or the chain), plus the root's."""
    return k + (tree_rows(spec) if spec.kind == "dynamic" else spec.depth) + 1


def run_step(graphs, graphed: bool, key: tuple, k: int, spec: TreeSpec, sampling, ints: torch.Tensor,
             noise: torch.Tensor | None, step_body: Callable, tree_body: Callable):
    """One step of a drafter that drafts on the device: `tree_body(k, spec, sampling, ints, noise)`
    for a dynamic tree, else `step_body(k, depth, sampling, ints, noise)` (a chain, or depth 0:
    feeding only), replayed from a CUDA graph per (key, k, spec, sampling, greedy) when graphed."""
    if spec.kind == "dynamic":
        body = lambda *bufs: tree_body(k, spec, sampling, *bufs)  # noqa: E731
    else:
        body = lambda *bufs: step_body(k, spec.depth, sampling, *bufs)  # noqa: E731
    return run_body(graphs, graphed, ("step", k, spec, sampling, noise is None, *key), body, (ints, noise))


def propose(run_step: Callable, expander: Callable, new: list[int], spec: TreeSpec, sampling, gen,
            on_device: bool) -> Proposal:
    """A drafter's proposal for `spec` once the tokens `new` are fed: with `on_device`, chains and
    dynamic trees come from one device body, `run_step(new, spec, sampling, gen)`; other shapes (and
    everything off the fast path) are grown by `tree.grow_tree` over `expander(sampling)` after
    `run_step` has fed `new` (drafting nothing)."""
    if on_device and spec.kind == "chain":
        return chain_proposal(*run_step(new, spec, sampling, gen))
    if on_device and spec.kind == "dynamic":
        return to_proposal(run_step(new, spec, sampling, gen), spec)
    if new:
        run_step(new, NO_TREE, sampling, gen)
    return grow_tree(expander(sampling), spec, not sampling.greedy, gen)
