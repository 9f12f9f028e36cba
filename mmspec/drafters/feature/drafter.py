"""The engine-facing feature drafter: FeatureDrafter (start / observe / propose over one request's
`_Request` and the network's preallocated `_Buffers`, leased per network and reused by later
requests; the fast path's chains and dynamic trees drafted on the device, from CUDA graphs on a
GPU) and `create_feature_drafter` (an untrained one for a target). The network is in `net`, the
prompt's entries in `plan`, saving and loading in `files`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from mmspec import device_tree
from mmspec.drafters.base import DraftContext, Drafter
from mmspec.drafters.feature.calibrate import calibrate_entropy
from mmspec.drafters.feature.net import FeatNet, RopeTable, Shared, make_config, size_report
from mmspec.drafters.feature.plan import QUERY, Entry, image_grid, image_span, plan_entries
from mmspec.graphs import BufferPool, DeviceNoise, GraphTable
from mmspec.kvcache import to_device
from mmspec.tree import TreePool, TreeSpec, tree_attention
from mmspec.verify import Sampling, draft_probs


_BIG = 2**62  # DREAM memory rows not yet written carry this position: no entry ever sees them


class _Buffers:
    """Preallocated state of one drafter network, leased per network and reused by later requests
    (CUDA graphs captured over it hold these addresses): its KV cache, the target features it
    reads, DREAM's memory, AASD's projected target cache, ViSpec's global vector, the root's
    predicted features and a RoPE table. Rows past what a request wrote are stale and masked out.

    AASD's projected target cache lives in the same key/value buffers as the drafter's own rows
    (rows cap.. of its first layer, the one that reads it), so a forward attends over one buffer
    instead of concatenating both every step. An entry written at row r sees key row j when order[j] <= r: an own row j
    has order j, a target-cache row -1 (seen by every entry) or _BIG (past the prompt's rows)."""

    def __init__(self, net: FeatNet, cap: int, device: torch.device, dtype: torch.dtype):
        c = net.cfg
        self.cap, self.device, self.dtype = cap, device, dtype
        z = lambda *shape: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        width = 2 * cap if c.aasd else cap
        widths = [width] + [cap] * (len(net.layers) - 1)  # the target's cache is read by the first layer only
        self.kv = [(z(1, c.kv_heads, w, c.head_dim), z(1, c.kv_heads, w, c.head_dim)) for w in widths]
        self.F = {idx: z(cap, c.hidden) for idx in net.target_layers}
        self.cols = torch.arange(cap, device=device)
        self.order = torch.cat([self.cols, torch.full((width - cap,), _BIG, device=device)])
        m = len(c.dream_layers) * cap
        self.cross = ((z(1, c.kv_heads, m, c.head_dim), z(1, c.kv_heads, m, c.head_dim),
                       torch.full((m,), _BIG, dtype=torch.long, device=device)) if net.cross is not None else None)
        self.aasd = (self.kv[0][0][:, :, cap:], self.kv[0][1][:, :, cap:]) if c.aasd else None
        self.g = z(c.hidden) if c.global_image else None
        self.root = z(c.flash, c.hidden)  # predicted features after the last committed entry
        # RoPE positions stay below 2 * cap: the prompt's (< P <= cap) plus one per entry fed since.
        self.rope = RopeTable(2 * cap, c.head_dim, c.rope_theta, device, dtype)
        self.graphs = GraphTable(device)

    def set_aasd_rows(self, n: int) -> None:
        """The first n target-cache rows are every entry's to see, the rest nobody's."""
        self.order[self.cap : self.cap + n] = -1
        self.order[self.cap + n :] = _BIG

    def copy_from(self, old: "_Buffers") -> None:
        """Take over what `old` (smaller) holds: the eager path grows its buffers this way."""
        n = old.cap
        for (k, v), (ok, ov) in zip(self.kv, old.kv):
            k[:, :, :n], v[:, :, :n] = ok[:, :, :n], ov[:, :, :n]
        for idx, f in self.F.items():
            f[:n] = old.F[idx]
        if self.cross is not None:
            m = old.cross[2].shape[0]
            self.cross[0][:, :, :m], self.cross[1][:, :, :m] = old.cross[0], old.cross[1]
            self.cross[2][:m] = old.cross[2]
        if self.aasd is not None:
            self.aasd[0][:, :, :n], self.aasd[1][:, :, :n] = old.aasd
            self.order[self.cap : self.cap + n] = old.order[n:]
        if self.g is not None:
            self.g.copy_(old.g)
        self.root.copy_(old.root)


_BUFFERS = BufferPool(_Buffers)


@dataclass
class _Request:
    """What one prompt's decoding holds in the drafter (host side; tensors live in `_Buffers`)."""

    prompt_ids: list[int]
    span: tuple[int, int] | None  # the image tokens (first index, count)
    plan: list[Entry]  # the drafter's entries for the prompt
    visual_map: dict | None
    adapt: torch.Tensor | None  # adaptor outputs (QUERY entries; the last is ViSpec's global vector)
    fast_path: bool  # chains and dynamic trees drafted on the device (`_run_step`), else grown by grow_tree
    graphed: bool  # ... and replayed from CUDA graphs
    n_feat: int  # target features held (committed target positions)
    n_cache: int = 0  # committed drafter entries (KV rows)
    n_fed: int = 0  # drafter positions fed (committed)
    forwards: int = 0  # drafter forwards this step
    global_vector: bool = False  # the variant has ViSpec's global image vector

    @property
    def P(self) -> int:
        return len(self.prompt_ids)

    @property
    def global_image(self) -> bool:
        """ViSpec's global vector is fused into text entries (only when the prompt has an image)."""
        return self.adapt is not None and self.global_vector


class FeatureDrafter(Drafter):
    kind = "feature"

    def __init__(self, net: FeatNet, target, name: str = "feature", meta: dict | None = None):
        self.net = net
        self.target = target
        self.name = name
        self.meta = dict(meta or {})
        self.cfg = net.cfg
        self.target_layers = net.target_layers
        self._row = {idx: i for i, idx in enumerate(self.target_layers)}
        self.req: _Request | None = None
        self.buf: _Buffers | None = None
        self._noise = DeviceNoise()

    def info(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "name": self.name, "kind": self.kind, "variant": c.variant, "options": _jsonable(c.options()),
            "entropy_profile": [round(float(x), 5) for x in self.meta.get("entropy_profile", [])],
            "chosen_layers": list(c.dream_layers) if c.dream else list(self.meta.get("chosen_layers", [])),
            "dream_uses_chosen_layers": c.dream, "supervised_layer": self.meta.get("supervised_layer"),
            "target_layers": list(self.target_layers), "trained": self.meta.get("trained", True),
            "quality": self.meta.get("quality"), **size_report(self.net),
        }

    @property
    def _dev(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def _dt(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    # --- per prompt ---------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, ctx: DraftContext) -> None:
        self.finish()
        net, c, tgt, dev = self.net, self.cfg, ctx.target, self._dev
        ids = list(ctx.prompt_ids)
        P = len(ids)
        # The fast path's room bounds every row a request writes; eagerly the buffers grow instead.
        fast = ctx.cache_room is not None
        buf = self.buf = _BUFFERS.lease(net, P + (ctx.cache_room if fast else 256), dev, self._dt)
        hid = ctx.target_hidden.to(dev, self._dt)  # [n_layers, P, H]
        for idx, r in self._row.items():
            buf.F[idx][:P] = hid[r]
        span = image_span(ids, tgt.family.media_token_ids(tgt.model.config))
        adapt, saliency, grid = None, None, None
        if span is not None:
            v0, n = span
            size = ctx.image.size if ctx.image is not None else None
            grid = image_grid(n, size, tgt.processor, ctx.image) if c.compress != "none" else None
            if c.needs["saliency"]:
                saliency = self._saliency(ctx, span, P).tolist()
            if net.adaptor is not None:
                adapt = net.adaptor(buf.F[0][v0 : v0 + n][None])[0]
                if c.global_image:
                    buf.g.copy_(adapt[-1])
        plan, vmap = plan_entries(P, span, grid, c, saliency, P - 1 if c.aasd else 0)
        if c.aasd:
            layer = ctx.target_cache.cache.layers[c.aasd_layer % c.L]
            K, V = net.aasd_memory(layer.keys[:, :, : P - 1].to(dev, self._dt), layer.values[:, :, : P - 1].to(dev, self._dt))
            buf.aasd[0][:, :, : P - 1], buf.aasd[1][:, :, : P - 1] = K, V
            buf.set_aasd_rows(P - 1)
        if buf.cross is not None:
            buf.cross[2].fill_(_BIG)
        self.req = _Request(ids, span, plan, vmap, adapt, fast, fast and ctx.cuda_graphs and dev.type == "cuda", P,
                            global_vector=c.global_image)
        self._noise.reset()

    def finish(self) -> None:
        _BUFFERS.give_back(self.net, self.buf)
        self.buf, self.req = None, None

    def _saliency(self, ctx, span, P) -> torch.Tensor:
        from mmspec import entropy

        v0, n = span
        c = self.cfg
        q = torch.arange(v0 + n, P)
        if len(q) == 0:
            q = torch.tensor([P - 1])
        tm = ctx.target_cache
        pos = ctx.target.family.position_ids(q, tm.rope_offset).to(self._dev)
        h_in = self.buf.F[c.L - 1][q.to(self._dev)][None]
        keys = tm.cache.layers[c.L - 1].keys[:, :, :P]
        qmask = torch.ones(1, len(q), dtype=torch.bool)
        sal = entropy.visual_saliency(ctx.target.model, h_in, keys, pos, q[None], qmask, torch.tensor([v0]), n)
        return sal[0].float().cpu()

    @torch.no_grad()
    def observe(self, target_hidden: torch.Tensor, tokens: list[int]) -> None:
        req, k = self.req, target_hidden.shape[1]
        self._reserve(req.n_feat + k)
        hid = target_hidden.to(self._dev, self._dt)
        for idx, r in self._row.items():
            self.buf.F[idx][req.n_feat : req.n_feat + k] = hid[r]
        req.n_feat += k

    def _reserve(self, rows: int) -> None:
        """Room for `rows` entries / features (on the fast path the engine's room makes growing rare)."""
        self.buf = _BUFFERS.grown(self.net, self.buf, rows)

    # --- network pieces over the buffers ----------------------------------------------------------
    def _embed(self, toks: torch.Tensor) -> torch.Tensor:
        return self.net.shared.embed(toks).to(self._dt)

    def _forward(self, x, pos, rows, src=None, allowed=None):
        """Entries x [T, H] at RoPE positions pos [T], written at cache rows [T] (device tensors).
        allowed [T, cap]: which rows each entry sees (default: every row up to its own, i.e. the
        committed entries and the entries fed before it in this call). src [T]: the last feature
        position each entry may read in DREAM's memory (None = all)."""
        net, buf = self.net, self.buf
        T = x.shape[0]
        if allowed is None:
            allowed = buf.order[None, :] <= rows[:, None]
        elif buf.aasd is not None:  # the target-cache rows after the drafter's own
            allowed = torch.cat([allowed, (buf.order[buf.cap :] < 0)[None].expand(T, -1)], 1)
        cross = None
        if buf.cross is not None:
            lim = src if src is not None else torch.full((T,), _BIG - 1, device=x.device)
            cross = (buf.cross[0], buf.cross[1], (buf.cross[2][None, :] <= lim[:, None])[None])
        r, _, _ = net.run(x[None], pos[None], buf.kv, allowed[None], None, cross, write_rows=rows, rope_table=buf.rope)
        return net.head_feats(r[0])  # [T, flash, H]

    def _write_memory(self, lo, ps: torch.Tensor) -> None:
        """DREAM: the chosen layers' features at positions ps (lo, lo+1, ...) into the memory."""
        net, c, buf = self.net, self.cfg, self.buf
        if buf.cross is None:
            return
        nL = len(c.dream_layers)
        feats = torch.stack([buf.F[c.hs_index(i)].index_select(0, ps) for i in c.dream_layers])[None]
        K, V = net.cross.memory(feats)  # [1, kv, nL * k, d], layer-major
        rows = lo * nL + torch.arange(nL * len(ps), device=ps.device)
        buf.cross[0].index_copy_(2, rows, K)
        buf.cross[1].index_copy_(2, rows, V)
        buf.cross[2].index_copy_(0, rows, ps.repeat(nL))

    def _inputs(self, toks: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Text entries: fc(emb(token), feature), then ViSpec's global image fusion."""
        x = self.net.input_x(self._embed(toks), feats)
        return self.net.fuse_global(x, self.buf.g) if self.req.global_image else x

    # --- the prompt (eager, once per request) -----------------------------------------------------
    def _feed_prompt(self, seq: list[int], upto: int) -> None:
        net, req, buf, dev = self.net, self.req, self.buf, self._dev
        P, entries = req.P, list(req.plan) + [Entry([p], p, post=req.span is not None) for p in range(req.P, upto + 1)]
        # Per-position inputs x_p = input(emb(token[p+1]), feature[p]) for p in 0..upto; inside the
        # prompt emb is the target's own input embedding (image features at image tokens).
        emb = torch.cat([buf.F[0][1 : min(P, upto + 2)], self._embed(torch.tensor(seq[P : upto + 2], device=dev))])
        vis = torch.zeros(upto + 1, dtype=torch.bool, device=dev)
        if req.span is not None:
            v0, n = req.span
            vis[v0 - 1 : v0 + n - 1] = True
        hs = {idx: f[: upto + 1] for idx, f in buf.F.items()}
        xp = net.input_x(emb, net.feature_in(hs), vis)
        xs = []
        for e in entries:
            if e.kind == QUERY:
                xs.append(req.adapt[e.slot])
                continue
            x = xp[e.members[0]] if len(e.members) == 1 else xp[torch.tensor(e.members, device=dev)].mean(0)
            xs.append(net.fuse_global(x, buf.g) if e.post and req.global_image else x)
        self._reserve(len(entries))
        self._write_memory(0, torch.arange(upto + 1, device=dev))
        pos = torch.tensor([e.rope for e in entries], device=dev)
        src = torch.tensor([e.src for e in entries], device=dev)
        heads = self._forward(torch.stack(xs), pos, torch.arange(len(entries), device=dev), src)
        buf.root.copy_(heads[-1])
        req.n_cache, req.n_fed = len(entries), upto + 1
        req.forwards += 1

    # --- one step: feed what was accepted, then draft --------------------------------------------
    def _feed_accepted(self, k: int, ints) -> None:
        """The k entries committed since the last step, from ints = [first cache row, first drafter
        position, the k tokens]; the last one's predicted features become the root's."""
        if not k:
            return
        buf, row, lo = self.buf, ints[0], ints[1]
        ps = lo + torch.arange(k, device=ints.device)
        self._write_memory(lo, ps)
        feats = self.net.feature_in({idx: f.index_select(0, ps) for idx, f in buf.F.items()})
        heads = self._forward(self._inputs(ints[2 : 2 + k], feats), ps, row + ps - lo, ps)
        buf.root.copy_(heads[-1])

    def _step_body(self, k: int, depth: int, sampling: Sampling, ints, noise):
        """Feed the accepted entries, then draft a chain of `depth` tokens from the new root, all on
        the device (one CUDA graph per (k, depth, sampling) on a GPU). Returns the chain's tokens
        [depth], their q [depth] and q rows [depth, V] (nothing when depth is 0)."""
        self._feed_accepted(k, ints)
        return self._chain(ints[0] + k, ints[1] + k - 1, depth, sampling, noise) if depth else None

    def _tree_body(self, k: int, spec: TreeSpec, sampling: Sampling, ints, noise) -> device_tree.DeviceTree:
        """Feed the accepted entries, then grow an EAGLE-2 dynamic tree on the device."""
        self._feed_accepted(k, ints)
        net, buf = self.net, self.buf
        base = ints[1] + k - 1  # RoPE position of the root entry

        def expand(depth, tokens, feeds, rows, allowed):
            heads = self._forward(self._inputs(tokens, feeds), (base + depth).expand(rows.shape), rows, None, allowed)[:, 0]
            return draft_probs(net.logits(heads), sampling), heads

        root_q = draft_probs(net.logits(buf.root[0])[None], sampling)[0]
        return device_tree.grow(expand, root_q, buf.root[0], spec, ints[0] + k, buf.cols, noise)

    def _chain(self, row, base, depth: int, sampling: Sampling, noise):
        """Draft `depth` tokens after the root (RoPE position `base`), writing fed nodes from cache
        row `row` on. FLASH's k heads give k levels per forward: a node is fed with the feature that
        predicted it once its anchor's heads are used up."""
        net, kf, dev = self.net, self.cfg.flash, self.buf.root.device
        heads, j, since = self.buf.root, 0, []
        toks, probs, rows = [], [], []
        # Node at chain index i (depth i + 1) is fed at row row + i, position base + 1 + i: index
        # arithmetic once per body, slices per forward (each tensor op is a kernel on the device).
        steps = torch.arange(max(depth, 1), device=dev)
        node_pos, node_row = base + 1 + steps, row + steps
        for d in range(depth):
            if j == kf:  # feed the kf nodes drafted since the anchor (depths d-kf+1..d)
                if kf == 1:
                    x = self._inputs(since[0][0], since[0][1][None])
                else:
                    x = self._inputs(torch.cat([t for t, _ in since]), torch.stack([f for _, f in since]))
                heads = self._forward(x, node_pos[d - kf : d], node_row[d - kf : d])[-1]
                j, since = 0, []
            f = heads[j]
            q = draft_probs(net.logits(f)[None], sampling)[0]
            token, q_token = device_tree.draw(q, None if noise is None else noise[d])
            toks.append(token)
            probs.append(q_token)
            rows.append(q)
            since.append((token, f))
            j += 1
        return torch.cat(toks), torch.cat(probs), torch.stack(rows)

    def _run_step(self, new_tokens: list[int], spec: TreeSpec, sampling: Sampling, gen):
        """Feed the accepted tokens and draft `spec` (a chain, a dynamic tree, or nothing: kind
        "none") in one body on the device, replayed from a CUDA graph per shape on a GPU."""
        req, dev, k = self.req, self._dev, len(new_tokens)
        tree = spec.kind == "dynamic"
        self._reserve(req.n_cache + device_tree.step_rows(spec, k))
        ints = to_device(torch.tensor([req.n_cache, req.n_fed, *new_tokens], dtype=torch.long), dev)
        noise = self._noise.for_draft(spec, sampling, self.net.shared.lm_head.weight.shape[0], dev, gen)
        out = device_tree.run_step(self.buf.graphs, req.graphed, (req.global_image,), k, spec, sampling, ints, noise,
                                   self._step_body, self._tree_body)
        req.n_cache += k
        req.n_fed += k
        req.forwards += (1 if k else 0) + (spec.depth - 1 if tree else max(spec.depth - 1, 0) // self.cfg.flash)
        return out

    @torch.no_grad()
    def propose(self, committed, spec, sampling, gen):
        req = self.req
        seq, upto = device_tree.pending(req.prompt_ids, committed, req.n_feat, "feature drafter")
        req.forwards = 0
        if req.n_fed == 0:
            self._feed_prompt(seq, upto)
        new = seq[req.n_fed + 1 : upto + 2]  # token[p + 1] of each position p not yet fed
        # On the fast path chains and (single-head) dynamic trees are drafted on the device.
        on_device = req.fast_path and (spec.kind == "chain" or spec.kind == "dynamic" and self.cfg.flash == 1)
        prop = device_tree.propose(self._run_step, self._tree_expander, new, spec, sampling, gen, on_device)
        prop.extras = {"drafter_forwards": req.forwards}
        if req.visual_map is not None:
            prop.extras["visual_map"] = req.visual_map
        return prop

    def _tree_expander(self, sampling: Sampling):
        """grow_tree's expand over the buffers: nodes are fed after the committed rows in the order
        they are expanded and see their ancestors (rows past the committed ones are never kept)."""
        net, req, buf, dev, kf = self.net, self.req, self.buf, self._dev, self.cfg.flash
        base = req.n_fed - 1  # RoPE position of the root entry
        heads: dict[int, torch.Tensor] = {-1: buf.root.clone()}
        fed: list[int] = []

        def anchor(pool: TreePool, i: int) -> tuple[int, int]:
            a, j = i, 0
            while a not in heads:
                a = pool.parents[a]
                j += 1
            return a, j

        def feed(pool: TreePool, order: list[int]) -> None:
            feats = []
            for n in order:
                a, j = anchor(pool, n)
                feats.append(heads[a][min(j, kf) - 1])
            toks = torch.tensor([pool.tokens[n] for n in order], device=dev)
            pos = torch.tensor([base + pool.depths[n] for n in order], device=dev)
            start, T = req.n_cache + len(fed), len(order)
            self._reserve(start + T)
            anc = tree_attention(pool.parents)[1:, 1:]
            allowed = torch.zeros(T, self.buf.cap, dtype=torch.bool)
            allowed[:, : req.n_cache] = True
            allowed[:, req.n_cache : start + T] = anc[torch.tensor(order)][:, torch.tensor(fed + order)]
            out = self._forward(self._inputs(toks, torch.stack(feats)), pos, torch.arange(start, start + T, device=dev),
                                None, allowed.to(dev))
            req.forwards += 1
            heads.update(zip(order, out))
            fed.extend(order)

        def expand(pool: TreePool, ids: list[int]) -> torch.Tensor:
            todo: set[int] = set()
            for i in ids:
                a, j = anchor(pool, i)
                n = i
                while j >= kf and n != a:  # the path since the anchor is fed once its heads are used up
                    todo.add(n)
                    n = pool.parents[n]
            if todo:
                feed(pool, sorted(todo, key=lambda n: (pool.depths[n], n)))
            rows = [heads[a][j] for a, j in (anchor(pool, i) for i in ids)]
            return draft_probs(net.logits(torch.stack(rows)), sampling)

        return expand


def create_feature_drafter(variant: str, target, seed: int = 0, profile: list[float] | None = None,
                           examples: list | None = None, **overrides) -> FeatureDrafter:
    """An untrained (random-init) drafter of a variant for `target`: for tests and as the start of training.
    DREAM's layers are chosen from the attention-entropy `profile`, else from one calibrated over
    `examples` ((image, prompt) pairs, e.g. `mmspec.world.default_calibration()`)."""
    from mmspec import entropy

    profile = profile if profile is not None else calibrate_entropy(target, examples)
    choice = entropy.choose_layers(profile)
    cfg = make_config(variant, target.model, choice, **overrides)
    torch.manual_seed(seed)
    net = FeatNet(cfg, Shared(target.model)).to(target.device, target.dtype).eval()
    meta = {"name": f"feat-{variant}", "entropy_profile": profile, "chosen_layers": list(choice[0]),
            "supervised_layer": choice[1], "trained": False}
    return FeatureDrafter(net, target, name=f"feat-{variant}", meta=meta)


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
