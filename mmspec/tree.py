"""Draft shapes (chain, static tree, dynamic tree), how a tree is grown from a drafter, and tree masks.

A drafter that has a next-token distribution exposes `expand(pool, node_ids) -> probs [len, V]`
(node -1 = the root) and `grow_tree` builds the tree from it:
- chain:K       one child per node, K deep;
- static:FILE   Medusa/EAGLE-1 style list of paths of child ranks, e.g. [[0], [1], [0, 0]];
- dynamic:N,D,K EAGLE-2: each level expands the K best frontier nodes by cumulative draft
                log-probability into K children each; the N best nodes of the pool are kept.

Children of a node are chosen as the top-k of the drafter's distribution when decoding greedily
and as k draws *without replacement* (Gumbel-top-k) when sampling. The sampling rule is what makes
multi-candidate rejection sampling in `verify.py` lossless: children are kept as a prefix of their
draw order, and the proposal distribution of every expanded node is returned with the tree.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mmspec.errors import InputError
from mmspec.kvcache import to_device
from mmspec.trace import DraftTree
from mmspec.verify import gumbel_scores


@dataclass(frozen=True)
class TreeSpec:
    kind: str  # "chain", "static", "dynamic" or "none" (vanilla)
    depth: int = 0
    topk: int = 1
    budget: int = 0
    paths: tuple[tuple[int, ...], ...] = ()

    @property
    def max_nodes(self) -> int:
        if self.kind == "chain":
            return self.depth
        if self.kind == "static":
            return len(self.paths)
        return self.budget if self.kind == "dynamic" else 0

    def describe(self) -> str:
        if self.kind == "chain":
            return f"chain:{self.depth}"
        if self.kind == "dynamic":
            return f"dynamic:{self.budget},{self.depth},{self.topk}"
        if self.kind == "static":
            return f"static({len(self.paths)} nodes, depth {self.depth})"
        return "none"

    def limited(self, max_depth: int) -> "TreeSpec":
        """The same shape cut to `max_depth` (near max_new_tokens there is no point drafting deeper)."""
        if max_depth >= self.depth:
            return self
        if max_depth <= 0:
            return NO_TREE
        if self.kind == "static":
            paths = tuple(p for p in self.paths if len(p) <= max_depth)
            return TreeSpec("static", max_depth, self.topk, 0, paths)
        return TreeSpec(self.kind, max_depth, self.topk, self.budget)


NO_TREE = TreeSpec("none")


# Limits on every tree shape, stated to users and checked before any work: growth and verification
# cost grows with nodes and depth, and a spec may come from an untrusted file or request.
MAX_TREE_NODES = 512
MAX_TREE_DEPTH = 32
MAX_TREE_TOPK = 64
MAX_CHAIN = 64
MAX_STATIC_BYTES = 256 * 1024  # a static tree within the limits is far smaller as JSON


def parse_tree_spec(text: str) -> TreeSpec:
    """Parse `chain:K`, `dynamic:BUDGET,DEPTH,TOPK`, `static:FILE` (JSON list of paths) or `static:[[0],[1]]`."""
    if not isinstance(text, str):
        raise InputError(f"a tree spec must be text such as chain:4, got {type(text).__name__}")
    kind, _, arg = text.strip().partition(":")
    try:
        if kind == "chain":
            k = int(arg)
            if not 1 <= k <= MAX_CHAIN:
                raise InputError(f"chain length must be between 1 and {MAX_CHAIN}")
            return TreeSpec("chain", depth=k)
        if kind == "dynamic":
            budget, depth, topk = (int(x) for x in arg.split(","))
            if not (1 <= budget <= MAX_TREE_NODES and 1 <= depth <= MAX_TREE_DEPTH and 1 <= topk <= MAX_TREE_TOPK):
                raise InputError(f"dynamic tree wants 1<=BUDGET<={MAX_TREE_NODES}, 1<=DEPTH<={MAX_TREE_DEPTH}, "
                                 f"1<=TOPK<={MAX_TREE_TOPK}")
            return TreeSpec("dynamic", depth=depth, topk=topk, budget=budget)
        if kind == "static":
            raw = arg if arg.lstrip().startswith("[") else _read_static_file(arg)
            if len(raw) > MAX_STATIC_BYTES:
                raise InputError(f"static tree text is over {MAX_STATIC_BYTES // 1024} KB; a tree within the "
                                 f"limits ({MAX_TREE_NODES} nodes, depth {MAX_TREE_DEPTH}) is far smaller")
            return static_spec(json.loads(raw))
        if kind in ("none", "vanilla"):
            return NO_TREE
    except InputError:
        raise
    except (ValueError, OSError, TypeError, RecursionError) as e:  # RecursionError: JSON nested 100k deep
        raise InputError(f"cannot parse tree spec {text[:80]!r}: {type(e).__name__}: {str(e)[:200]}") from e
    raise InputError(f"unknown tree spec {text[:80]!r}: use chain:K, dynamic:BUDGET,DEPTH,TOPK or static:FILE")


def _read_static_file(name: str) -> str:
    """The file's text, reading at most one byte past the limit (a FIFO or /dev/zero must not hang)."""
    path = Path(name)
    if not path.is_file():
        raise InputError(f"static tree file {name} does not exist or is not a regular file")
    with path.open("rb") as f:
        return f.read(MAX_STATIC_BYTES + 1).decode("utf-8")


def _rank_path(p) -> tuple[int, ...]:
    """One path of child ranks, type- and range-checked (JSON may hold floats, strings, infinities)."""
    if not isinstance(p, list) or len(p) > MAX_TREE_DEPTH:
        raise InputError(f"each static tree path must be a list of at most {MAX_TREE_DEPTH} ranks")
    for r in p:
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < MAX_TREE_TOPK:
            raise InputError(f"static tree ranks must be integers in [0, {MAX_TREE_TOPK}), got {repr(r)[:40]}")
    return tuple(p)


def static_spec(paths: list[list[int]]) -> TreeSpec:
    """Validate a list of rank paths: every prefix of a path must itself be a path."""
    # Sizes first, so that a huge list is refused before any per-path work.
    if not isinstance(paths, list) or len(paths) > MAX_TREE_NODES:
        raise InputError(f"a static tree is a JSON list of at most {MAX_TREE_NODES} paths, e.g. [[0], [1], [0, 0]]")
    norm = sorted({_rank_path(p) for p in paths if p != []}, key=lambda p: (len(p), p))
    have = set(norm)
    for p in norm:
        if len(p) > 1 and p[:-1] not in have:
            raise InputError(f"static tree path {list(p)} lacks its parent {list(p[:-1])}")
        # Sampling draws siblings in rank order without replacement; a gap would break losslessness.
        if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in have:
            raise InputError(f"static tree path {list(p)} lacks its elder sibling {list(p[:-1]) + [p[-1] - 1]}")
    if not norm:
        raise InputError("static tree needs at least one path")
    return TreeSpec("static", depth=max(len(p) for p in norm), topk=1 + max(max(p) for p in norm), paths=tuple(norm))


# The drafter's side of tree growth: given the pool so far and the ids of nodes to expand
# (-1 = root), return their next-token distributions, one row per id.
ExpandFn = Callable[["TreePool", list[int]], torch.Tensor]


@dataclass
class TreePool:
    """Every node proposed while growing one tree; the kept ones become the `DraftTree`."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    keys: list[float] = field(default_factory=list)  # ranking score, never above the parent's

    def add(self, token: int, parent: int, prob: float, key: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(1 if parent < 0 else self.depths[parent] + 1)
        self.probs.append(prob)
        self.keys.append(key)
        return len(self.tokens) - 1


@dataclass
class Proposal:
    tree: DraftTree
    # Proposal distribution q of the children of each parent (-1 = root), keyed by tree index;
    # None marks deterministic proposals (n-gram), verified as point masses.
    proposals: dict[int, torch.Tensor | None]
    extras: dict = field(default_factory=dict)
    # A drafter that picks its tokens on the device (the fast path's chain) leaves them there, so
    # the target can verify them without waiting for the host; `resolve` fills the tree afterwards.
    device_tokens: torch.Tensor | None = None  # [n] in tree order
    device_probs: torch.Tensor | None = None  # [n] q of each token
    # A dynamic tree drafted on the device (`device_tree.PendingTree`): the target verifies it from
    # its device tensors; the host tree, with its shape, arrives at `resolve`.
    device_tree: Any = None

    def resolve(self) -> None:
        """Copy device-chosen tokens into the tree, or a device tree into `tree` and `proposals`
        (one device-to-host copy; no-op otherwise)."""
        if self.device_tree is not None:
            self.tree, self.proposals = self.device_tree.host()
            self.device_tree = None
        if self.device_tokens is None:
            return
        tokens, probs = torch.stack([self.device_tokens.double(), self.device_probs.double()]).tolist()
        self.tree.tokens = [int(t) for t in tokens]
        self.tree.draft_probs = probs
        self.device_tokens = self.device_probs = None


def _choose(probs: torch.Tensor, k: int, sample: bool, gen: torch.Generator | None):
    """k children of each row of probs [R, V]: top-k (greedy) or Gumbel-top-k = k ordered draws
    without replacement. One device-to-host copy for all rows; returns (tokens, q, scores) per row."""
    logq = probs.float().log()
    scores = logq
    if sample:
        u = torch.rand(logq.shape, generator=gen, device="cpu")
        scores = gumbel_scores(logq, to_device(u, logq.device))
    k = min(k, probs.shape[-1])
    top = torch.topk(scores, k, dim=-1)
    nonzero = (probs > 0).sum(-1, keepdim=True)  # zero-probability tokens are never children
    host = torch.cat([top.indices.double(), probs.gather(-1, top.indices).double(), top.values.double(),
                      nonzero.double()], dim=-1).tolist()
    out = []
    for row in host:
        n = min(k, int(row[-1]))
        out.append(([int(t) for t in row[:n]], row[k : k + n], row[2 * k : 2 * k + n]))
    return out


def grow_tree(expand: ExpandFn, spec: TreeSpec, sample: bool, gen: torch.Generator | None) -> Proposal:
    """Grow one draft tree for `spec` by calling `expand` level by level."""
    pool = TreePool()
    qdist: dict[int, torch.Tensor] = {}
    if spec.kind == "none" or spec.depth <= 0:
        return Proposal(DraftTree(), {})
    if spec.kind in ("chain", "static"):
        paths = [(0,) * d for d in range(1, spec.depth + 1)] if spec.kind == "chain" else list(spec.paths)
        node_of: dict[tuple[int, ...], int] = {(): -1}
        for depth in range(1, spec.depth + 1):
            level = [p for p in paths if len(p) == depth and p[:-1] in node_of]
            parents = sorted({p[:-1] for p in level}, key=lambda p: node_of[p])
            if not parents:
                break
            rows = expand(pool, [node_of[p] for p in parents])
            wants = [sorted(p[-1] for p in level if p[:-1] == prefix) for prefix in parents]
            choices = _choose(rows, max(w[-1] for w in wants) + 1, sample, gen)
            for prefix, row, want, (toks, qs, _) in zip(parents, rows, wants, choices):
                parent = node_of[prefix]
                qdist[parent] = row
                for rank in want:
                    if rank < len(toks):
                        node_of[prefix + (rank,)] = pool.add(toks[rank], parent, qs[rank], 0.0)
        keep = list(range(len(pool.tokens)))
    else:
        frontier = [-1]
        frontier_key = {-1: 0.0}
        for depth in range(1, spec.depth + 1):
            rows = expand(pool, frontier)
            new = []
            for parent, row, (toks, qs, scores) in zip(frontier, rows, _choose(rows, spec.topk, sample, gen)):
                qdist[parent] = row
                base = frontier_key[parent]
                for t, q, s in zip(toks, qs, scores):
                    # min() keeps a child's key below its parent's, so any top-N cut is a subtree.
                    key = min(base, base + s)
                    new.append(pool.add(t, parent, q, key))
            if depth == spec.depth or not new:
                break
            # Best first (ties to the earlier node): the device grows the same frontier with one sort.
            frontier = sorted(new, key=lambda i: (-pool.keys[i], i))[: spec.topk]
            frontier_key = {i: pool.keys[i] for i in frontier}
        order = sorted(range(len(pool.tokens)), key=lambda i: (-pool.keys[i], pool.depths[i], i))
        keep = sorted(order[: spec.budget])
    return _finish(pool, keep, qdist)


def _finish(pool: TreePool, keep: list[int], qdist: dict[int, torch.Tensor]) -> Proposal:
    keep = sorted(keep, key=lambda i: (pool.depths[i], i))
    new_index = {-1: -1}
    tree = DraftTree()
    for i in keep:
        new_index[i] = len(tree.tokens)
        tree.tokens.append(pool.tokens[i])
        tree.parents.append(new_index[pool.parents[i]])
        tree.depths.append(pool.depths[i])
        tree.draft_probs.append(float(pool.probs[i]))
    proposals = {new_index[p]: q for p, q in qdist.items() if p in new_index}
    return Proposal(tree, proposals)


def tree_from_paths(continuations: list[tuple[list[int], float]], spec: TreeSpec) -> DraftTree:
    """A trie of token continuations (deterministic drafters), cut to the spec's depth and size.

    Each continuation carries a weight (e.g. how often it was seen); a node's draft prob is the share
    of weight of its siblings' continuations that pass through it, for display only.
    """
    tree = DraftTree()
    child_of: dict[tuple[int, int], int] = {}
    weight: dict[int, float] = {}
    limit = spec.max_nodes
    width = 1 if spec.kind == "chain" else max(1, spec.topk)
    for tokens, w in continuations:
        parent = -1
        for depth, tok in enumerate(tokens[: spec.depth], start=1):
            node = child_of.get((parent, tok))
            if node is None:
                siblings = sum(1 for (p, _t) in child_of if p == parent)
                if len(tree.tokens) >= limit or siblings >= width:
                    break
                node = len(tree.tokens)
                child_of[(parent, tok)] = node
                tree.tokens.append(tok)
                tree.parents.append(parent)
                tree.depths.append(depth)
                tree.draft_probs.append(0.0)
                weight[node] = 0.0
            weight[node] += w
            parent = node
    for i, p in enumerate(tree.parents):
        total = sum(weight[j] for j, q in enumerate(tree.parents) if q == p)
        tree.draft_probs[i] = weight[i] / total if total else 0.0
    # Renumber so that parents precede children and nodes are grouped by depth.
    order = sorted(range(len(tree.tokens)), key=lambda i: (tree.depths[i], i))
    remap = {-1: -1, **{old: new for new, old in enumerate(order)}}
    return DraftTree(
        tokens=[tree.tokens[i] for i in order],
        parents=[remap[tree.parents[i]] for i in order],
        depths=[tree.depths[i] for i in order],
        draft_probs=[tree.draft_probs[i] for i in order],
    )


def tree_attention(parents: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Ancestor-or-self mask over [root] + nodes: row i may attend to column j. Shape [n+1, n+1].

    Built with one gather per tree level (not one tensor op per node), on `device`: each round
    moves every row's pointer one parent up and marks it, the root pointing at itself.
    """
    n = len(parents)
    up = torch.tensor([0] + [p + 1 for p in parents], dtype=torch.long, device=device)
    depth = [0] * (n + 1)
    for i, p in enumerate(parents):  # plain ints: the level count, no tensor work per node
        depth[i + 1] = depth[p + 1] + 1
    rows = torch.arange(n + 1, device=device)
    mask = torch.eye(n + 1, dtype=torch.bool, device=device)
    mask[:, 0] = True
    cur = rows
    for _ in range(max(depth) - 1):
        cur = up[cur]
        mask[rows, cur] = True
    return mask
