"""Drafting on the device: EAGLE-2 dynamic trees grown with fixed sizes (no host round trip per
level), the pieces every device chain shares (`draw`, `chain_proposal`) and the choice between
device drafting and host-grown trees (`propose`).

The same tree as `tree.grow_tree` for `dynamic:BUDGET,DEPTH,TOPK` (same ranking keys, same
stable tie-breaks by pool index, children chosen as top-k or Gumbel-top-k of the drafter's q, so
kept as a prefix of their draw order), computed with tensors of fixed shape so that a drafter can
capture the whole growth in one CUDA graph:
- the pool holds TOPK level-1 nodes, then TOPK x TOPK candidates per further level, in the order
  grow_tree adds them; a candidate whose q is 0 is marked invalid instead of left out;
- each level's frontier (the TOPK best new candidates, best first) is fed at fixed cache rows
  row0 + (level - 1) * TOPK + j and sees the committed rows and its ancestors' rows;
- the BUDGET best valid pool nodes are kept, and what the target's verify forward reads of them
  (tokens, depths, ancestor mask) is made on the device too, so the target verifies the tree
  without waiting for the host (`pending_proposal`); the host tree arrives by one device-to-host
  copy, started before the verify forward is queued and read while it runs.
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
    # What the verify forward reads, in kept order (slots past n_kept are verified and ignored):
    verify_tokens: torch.Tensor  # [B] tokens of the kept nodes
    verify_offsets: torch.Tensor  # [1 + B] position after the root: 0 for the root, then each node's depth
    verify_mask: torch.Tensor  # [1 + B, 1 + B] ancestor-or-self over the root and the kept nodes


def tree_rows(spec: TreeSpec) -> int:
    """Cache rows the growth writes after row0."""
    return (spec.depth - 1) * spec.topk


def _children(q: torch.Tensor, k: int, noise: torch.Tensor | None):
    """Top-k (or Gumbel-top-k with uniforms `noise` [R, V]) children of each row of q [R, V]: their
    tokens, q and scores. A child whose q is 0 scores -inf (log 0; Gumbel noise is finite)."""
    logq = q.log()
    scores = logq if noise is None else gumbel_scores(logq, noise)
    top = torch.topk(scores, k, dim=-1)
    return top.indices, q.gather(-1, top.indices), top.values


def _best(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest keys, ties to the lower index, returned in index order."""
    return torch.sort(keys, descending=True, stable=True).indices[:n].sort().values


def grow(expand: Expand, root_q: torch.Tensor, root_feed: torch.Tensor, spec: TreeSpec, row0: torch.Tensor,
         cols: torch.Tensor, noise: torch.Tensor | None) -> DeviceTree:
    """root_q [V]: q after the root; root_feed: what the root's children are fed with; row0: first
    free cache row (device scalar); cols: arange over the drafter's cache; noise [DEPTH, K, V]
    uniforms when sampling (None: greedy).

    Every tensor op here is a kernel per level on the device, so the bookkeeping is lean: a node's
    key is -inf exactly when it is invalid (its q, or an ancestor's, is 0), a candidate's parent is
    its index // K in the frontier that made it, and the frontier's attention rows (the committed
    rows and its ancestors' rows) are carried whole, each level adding its own row."""
    K, D, dev = spec.topk, spec.depth, root_q.device
    rows = row0 + torch.arange(max(tree_rows(spec), 1), device=dev)  # frontier j of level d: rows[(d-1)K + j]
    tok, q, key = _children(root_q[None], K, None if noise is None else noise[0, :1])
    cand_tok, cand_key = tok[0], torch.clamp(key[0], max=0.0)
    pool_tok, pool_q, pool_key, q_rows, expanded = [cand_tok], [q[0]], [cand_key], [root_q[None]], []
    feed, anc, size = root_feed.expand(K, *root_feed.shape), None, 0
    for d in range(1, D):
        if d == 1:  # the root's K children are the whole first level: all of them are expanded
            f_idx, f_tok, f_key = torch.arange(K, device=dev), cand_tok, cand_key
            anc = (cols < row0).expand(K, -1).clone()
        else:
            best = torch.sort(cand_key, descending=True, stable=True)  # best first, as grow_tree
            sel, f_key = best.indices[:K], best.values[:K]
            parent = sel // K  # the frontier slot of the previous level that drafted the candidate
            f_idx, f_tok = size + sel, cand_tok[sel]
            feed, anc = feed[parent], anc[parent]
        anc.scatter_(1, rows[(d - 1) * K : d * K, None], True)
        fq, feed = expand(d, f_tok, feed, rows[(d - 1) * K : d * K], anc)
        q_rows.append(fq)
        expanded.append(f_idx)
        ctok, cq, cs = _children(fq, K, None if noise is None else noise[d])
        # A child's key stays at or below its parent's, so any top-N cut is a subtree. Greedy scores
        # are log q <= 0, so only Gumbel scores (which can be positive) need the min.
        ckey = f_key[:, None] + cs if noise is None else torch.minimum(f_key[:, None], f_key[:, None] + cs)
        size += K if d == 1 else K * K
        cand_tok, cand_key = ctok.reshape(-1), ckey.reshape(-1)
        pool_tok.append(cand_tok)
        pool_q.append(cq.reshape(-1))
        pool_key.append(cand_key)
    keys = torch.cat(pool_key)
    kept = _best(keys, min(spec.budget, keys.shape[0]))
    # Invalid nodes (key -inf) can only be kept when fewer valid ones exist: move them to the end.
    valid = keys[kept] > float("-inf")
    kept = kept[torch.sort((~valid).long(), stable=True).indices]
    exp = torch.stack(expanded) if expanded else torch.zeros(0, K, dtype=torch.long, device=dev)
    # Level d's K x K candidates hang under level d-1's expanded nodes, K children each.
    parents = torch.cat([torch.full((K,), -1, device=dev), exp[:, :, None].expand(-1, K, K).reshape(-1)])
    tokens = torch.cat(pool_tok)
    anc = _ancestors(parents, D)[kept]
    mask = torch.zeros(1 + kept.shape[0], 1 + kept.shape[0], dtype=torch.bool, device=dev)
    mask[:, 0] = True
    mask[1:, 1:] = anc[:, kept] > 0
    offsets = torch.cat([torch.zeros(1, device=dev), anc.sum(-1)]).long()  # a node's ancestors-or-self: its depth
    return DeviceTree(tokens, parents, torch.cat(pool_q), kept, valid.sum(), exp, torch.cat(q_rows),
                      tokens[kept], offsets, mask)


def _ancestors(parents: torch.Tensor, depth: int) -> torch.Tensor:
    """[N, N] 0/1 (float): row i marks i and its ancestors among pool nodes with `parents` [N]
    (-1 = root), at most `depth` deep. The closure of the parent relation by repeated squaring:
    a few matmuls instead of one gather per level (the counts stay small integers, exact in any
    float format)."""
    n = parents.shape[0]
    a = torch.eye(n, device=parents.device)
    a[torch.arange(n, device=parents.device), parents.clamp(min=0)] += (parents >= 0).float()
    for _ in range(max(depth - 2, 0).bit_length()):  # paths of up to 2^r edges after r rounds
        a = (a @ a).clamp_(max=1.0)
    return a


class PendingTree:
    """A device tree on its way to the host: one device-to-host copy of what the host tree needs,
    started when the proposal is made (before the verify forward is queued), read by `host()`."""

    def __init__(self, t: DeviceTree, spec: TreeSpec):
        self.t, self.spec = t, spec
        ints = torch.cat([t.kept, t.n_kept.view(1), t.tokens, t.parents, t.expanded.reshape(-1)]).double()
        packed = torch.cat([ints, t.q.double()])
        self.event = None
        if packed.device.type == "cuda":
            self.copy = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self.copy.copy_(packed, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.copy = packed

    def verify_inputs(self, root: int, root_pos: int):
        """The root and the kept slots as the target's verify forward reads them, on the device:
        tokens [1 + B], positions [1 + B] and the ancestor-or-self mask [1 + B, 1 + B]."""
        t = self.t
        toks = torch.cat([torch.full((1,), root, device=t.verify_tokens.device), t.verify_tokens])
        return toks, t.verify_offsets + root_pos, t.verify_mask

    def host(self) -> tuple[DraftTree, dict]:
        """The kept nodes as a host `DraftTree` and the q rows of every expanded kept node (root: -1)
        as its proposals, as `tree.grow_tree` returns them."""
        if self.event is not None:
            self.event.synchronize()
        t, K = self.t, self.spec.topk
        host = self.copy.tolist()
        B, N = t.kept.shape[0], t.tokens.shape[0]
        n = int(host[B])
        kept = [int(i) for i in host[:n]]
        tokens, parents = host[B + 1 : B + 1 + N], host[B + 1 + N : B + 1 + 2 * N]
        expanded = [int(i) for i in host[B + 1 + 2 * N : B + 1 + 2 * N + t.expanded.numel()]]
        q = host[B + 1 + 2 * N + t.expanded.numel() :]
        new_index = {-1: -1, **{p: j for j, p in enumerate(kept)}}
        tree = DraftTree(tokens=[int(tokens[p]) for p in kept], parents=[new_index[int(parents[p])] for p in kept],
                         depths=[1 if p < K else 2 + (p - K) // (K * K) for p in kept],
                         draft_probs=[q[p] for p in kept])
        proposals = {-1: t.q_rows[0]}
        for row, p in enumerate(expanded, start=1):
            if p in new_index:
                proposals[new_index[p]] = t.q_rows[row]
        return tree, proposals


def pending_proposal(t: DeviceTree, spec: TreeSpec) -> Proposal:
    """A dynamic tree drafted on the device, verified from there (`Proposal.device_tree`); its host
    tree is filled by `Proposal.resolve`."""
    return Proposal(DraftTree(), {}, device_tree=PendingTree(t, spec))


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
        return pending_proposal(run_step(new, spec, sampling, gen), spec)
    if new:
        run_step(new, NO_TREE, sampling, gen)
    return grow_tree(expander(sampling), spec, not sampling.greedy, gen)
