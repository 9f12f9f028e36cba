"""`CachedModel`: one Hugging Face model, its KV cache and its family adapter.

The target and every model-based drafter go through it: a prefill with the processor's full output,
then forwards of new token ids only, with per-token positions and a tree attention mask. The cache
holds `committed` entries that every new token sees, plus uncommitted entries (tree nodes fed so
far) that a new token sees only where `tail_mask` says so.

The fast path (`room` given): a preallocated `StaticKV` of prompt + room positions; a forward's
inputs (token ids, positions, cache rows, the tree part of the mask) travel in one packed host
tensor and one asynchronous copy, and the mask over the whole cache is built from them on the
device. On one CUDA device each forward is replayed from a CUDA graph captured once per layout
(q and the tree-mask width rounded up to powers of two; pad rows' outputs and cache rows are
dropped), and so is the prefill (prompt length rounded up to 64, one graph per length and image
layout). A draft model drafts chains (`draft_chain`) and dynamic trees (`draft_tree`) there too.
Token ids may already be on the device (a drafter's device-side chain): then nothing in
a forward waits for the host. Static buffers and graphs are leased per model and reused by later
generations, so capture happens once per layout, not once per request.
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager

import torch

from mmspec import device_tree, graphs, kvcache
from mmspec.kvcache import to_device
from mmspec.families import Family, attention_masks
from mmspec.verify import Sampling, draft_probs


def _placed(entry) -> torch.device:
    """A device from an accelerate `hf_device_map` entry (an int GPU index, "cpu", "disk", ...)."""
    if entry in ("cpu", "disk"):  # disk-offloaded layers are computed on the CPU
        return torch.device("cpu")
    return torch.device(f"cuda:{entry}" if isinstance(entry, int) else entry)


def execution_device(model) -> torch.device:
    """Where inputs go: the device of the first module, also for a model split by accelerate
    (`device_map`), whose parameters may sit on several GPUs, the CPU or the disk (meta)."""
    device_map = getattr(model, "hf_device_map", None)
    return _placed(next(iter(device_map.values()))) if device_map else next(model.parameters()).device


def last_layer_device(model) -> torch.device:
    """Where a (possibly split) model computes its logits: drafters belong there."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return model.get_output_embeddings().weight.device
    return _placed(device_map.get("lm_head", next(reversed(device_map.values()))))


class _Static:
    """A leased StaticKV with the graphs captured over it (they hold its buffers' addresses)."""

    dtype = None  # the cache takes the model's dtype when first written

    def __init__(self, model, capacity: int, device: torch.device, dtype=None):
        config = getattr(model.config, "text_config", model.config)
        self.cap, self.device = capacity, device
        self.cache = kvcache.StaticKV(capacity, getattr(config, "num_hidden_layers", None))
        self.cols = torch.arange(capacity, device=device)
        self.key_pos = torch.arange(capacity, device=device)  # sequence position of each cache row (for windows)
        # keys: forward ((padded q, position shape, tail width), hidden), chain ("chain", depth,
        # sampling, greedy), prefill ("prefill", (padded length, position shape), hidden, ...);
        # graph kinds "prefill" and "decode" fall back to eager separately.
        self.graphs = graphs.GraphTable(device)


_STATIC = graphs.BufferPool(_Static)  # per model: a later request reuses a lease and its graphs


def cache_argument(model) -> str:
    """transformers' current name for the cache argument, `cache` (5.24 on); a model whose forward
    has no such parameter (transformers 5.17 on the lent GPU machine, where the repository is too
    large to carry a newer wheel beside it) gets the older `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _bucket(q: int) -> int:
    return 1 << (q - 1).bit_length()


class CachedModel:
    def __init__(self, model, family: Family, room: int | None = None, graphs: bool = False):
        """room: positions kept free after the prompt for the static fast path (None: DynamicCache).
        graphs: replay forwards from CUDA graphs (static path on a single CUDA device only)."""
        self.model = model
        self.family = family
        self._cache_name = cache_argument(model)
        self.device = execution_device(model)
        self.dtype = model.dtype
        self.cache = None
        self.committed = 0  # cache entries every new token attends to
        self.rope_offset = 0
        # Masks beyond causal (sliding windows) are built here, per forward, from query/key positions.
        self.windows = family.windows(model.config)
        self._tail_pos: list[torch.Tensor] = []  # sequence positions of the uncommitted rows (eager path)
        self.room = room if room is not None and not getattr(model, "hf_device_map", None) else None
        self.graphs = graphs and self.room is not None and self.device.type == "cuda"
        self._static: _Static | None = None

    def _cache_arg(self, cache) -> dict:
        return {self._cache_name: cache}

    def release(self) -> None:
        """Give the static buffers (and their graphs) back for the next generation on this model."""
        if self._static is not None:
            _STATIC.give_back(self.model, self._static)
            self._static = None
            self.cache = None

    @torch.inference_mode()
    def prefill(self, inputs: dict[str, torch.Tensor], hidden: bool = False):
        """Run the prompt; returns the last position's logits [V] (and hidden states if asked)."""
        host_ids = inputs["input_ids"].cpu()
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        self.rope_offset = self.family.rope_offset(self.model, inputs)
        pos = self.family.prefill_position_ids(self.model, inputs)
        if self.room is not None:
            return self._prefill_static(inputs, host_ids, pos, hidden)
        self.cache = kvcache.new_cache(self.model)
        self._tail_pos = []
        if pos is not None:
            inputs["position_ids"] = pos
        blocks = self.family.prefill_blocks(inputs)
        if blocks is not None or self.windows is not None:
            P = host_ids.shape[1]
            rows = torch.arange(P, device=self.device)
            inputs["attention_mask"] = self._masks(self._prefill_allowed(rows, rows, blocks), rows[:, None] - rows)
        out = self.model(**inputs, **self._cache_arg(self.cache), use_cache=True, output_hidden_states=hidden, logits_to_keep=1)
        self.committed = kvcache.cache_len(self.cache)
        return (out.logits[0, -1], out.hidden_states) if hidden else out.logits[0, -1]

    def _prefill_static(self, inputs: dict[str, torch.Tensor], ids: torch.Tensor, pos: torch.Tensor | None, hidden: bool):
        """The prompt into a leased StaticKV. Graphed, the prompt is padded to a multiple of 64
        tokens (pad rows come after the prompt, so causal attention hides them from it, and their
        cache rows are overwritten later) and replayed from a graph captured per padded length and
        image layout: a prefill is hundreds of small kernels, host-bound when eager (20 ms for the
        embedded target on an H100, 3.4 ms replayed)."""
        self.release()
        P = ids.shape[1]
        st = self._static = _STATIC.lease(self.model, P + self.room, self.device, None)
        self.cache = st.cache
        self.cache.length = 0
        graphed = self.graphs and st.graphs.usable("prefill")
        Pb = min(-(-P // 64) * 64, st.cache.capacity) if graphed else P
        if pos is None:  # the 4-D mask replaces the processor's, so positions are given explicitly
            pos = self.family.position_ids(torch.arange(P), 0)
        pos = pos.cpu()
        pos = torch.cat([pos, pos[..., -1:].expand(*pos.shape[:-1], Pb - P)], -1)
        # One packed host tensor: ids (padded with the last prompt token), positions, the row whose logits are kept.
        host = torch.empty(Pb + pos.numel() + 1, dtype=torch.long)
        host[:P], host[P:Pb], host[Pb:-1], host[-1] = ids[0], ids[0, -1], pos.reshape(-1), P - 1
        packed = to_device(host, self.device)
        rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
        for k, v in rest.items():  # per-token inputs (token_type_ids, ...) are padded like the ids
            if v.dim() == 2 and v.shape == (1, P) and Pb > P:
                rest[k] = torch.cat([v, v[:, -1:].expand(1, Pb - P)], 1)
        names = tuple(sorted(rest))
        tensors = tuple(rest[k] for k in names)
        blocks = self.family.prefill_blocks(inputs)
        if blocks is not None:  # pad rows are in no block
            blocks = torch.cat([blocks.to(self.device), blocks.new_full((Pb - P,), -1, device=self.device)])
        layout = (Pb, tuple(pos.shape))
        body = lambda packed, blocks, *tensors: self._prefill_body(st, layout, hidden, names, packed, blocks, tensors)  # noqa: E731
        if graphed:
            # What Python inside the model may branch on: shapes, small integer inputs (image grids,
            # sizes) and the count of image/video placeholder tokens, checked eagerly at first use.
            seen = tuple((tuple(t.shape), t.dtype, tuple(t.flatten().tolist()) if not t.is_floating_point()
                          and t.numel() <= 64 else None) for t in tensors)
            media = self.family.media_token_ids(self.model.config)
            key = ("prefill", layout, hidden, names, seen, sum(int((ids == m).sum()) for m in media))
            logits, hs = self._graph(st, key, body, (packed, blocks, *tensors), kind="prefill")
        else:
            logits, hs = body(packed, blocks, *tensors)
        self.cache.length = self.committed = P
        return (logits, tuple(h[:, :P] for h in hs)) if hidden else logits

    def _prefill_body(self, st: _Static, layout, hidden: bool, names: tuple[str, ...], packed, blocks, tensors):
        Pb, pos_shape = layout
        rows = st.cols[:Pb]
        st.cache.write_pos = rows
        allowed = self._prefill_allowed(rows, st.cols, blocks)
        out = self.model(input_ids=packed[:Pb].view(1, Pb), position_ids=packed[Pb:-1].view(pos_shape),
                         attention_mask=self._masks(allowed, rows.unsqueeze(1) - st.cols), cache_position=rows,
                         **self._cache_arg(st.cache), use_cache=True, output_hidden_states=hidden,
                         logits_to_keep=packed[-1:], **dict(zip(names, tensors)))
        return out.logits[0, -1], (out.hidden_states if hidden else None)

    @staticmethod
    def _prefill_allowed(rows: torch.Tensor, cols: torch.Tensor, blocks: torch.Tensor | None) -> torch.Tensor:
        """Causal over the prompt, plus both ways inside a block (block ids [P], -1 = none)."""
        allowed = cols.unsqueeze(0) <= rows.unsqueeze(1)
        if blocks is None:
            return allowed
        b = blocks.to(rows.device)
        same = (b.unsqueeze(1) == b.unsqueeze(0)) & (b.unsqueeze(1) >= 0)
        allowed[:, : b.shape[0]] |= same[: rows.shape[0]]
        return allowed

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(1, 1, *allowed.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    def _masks(self, allowed: torch.Tensor, dist: torch.Tensor):
        """The family's attention_mask (one tensor, or one per layer kind) from allowed [q, K] and dist [q, K]."""
        return attention_masks(self.windows, allowed, dist, self._additive)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, seq_pos: torch.Tensor, tail_mask: torch.Tensor | None, hidden: bool = False):
        """Feed `tokens` [q] at sequence positions `seq_pos` [q]; returns logits [q, V].

        tail_mask [q, T] (bool) says which uncommitted cache entries plus new tokens each token sees
        (T = uncommitted + q); None means plain causal attention.
        """
        if self.room is not None:
            return self._forward_static(tokens, seq_pos, tail_mask, hidden)
        q = tokens.shape[0]
        start = kvcache.cache_len(self.cache)
        seq_pos = seq_pos.to(self.device)
        mask = None
        if tail_mask is not None or self.windows is not None:
            total = start + q
            allowed = torch.arange(total, device=self.device) <= torch.arange(start, total, device=self.device)[:, None]
            if tail_mask is not None:
                allowed[:, self.committed :] = tail_mask.to(self.device)
            # Committed rows sit at their own index; uncommitted rows (tree nodes) where they were fed.
            keys = torch.cat([torch.arange(self.committed, device=self.device), *self._tail_pos, seq_pos])
            mask = self._masks(allowed, seq_pos[:, None] - keys)
        self._tail_pos.append(seq_pos)
        out = self.model(
            input_ids=tokens.to(self.device).unsqueeze(0),
            attention_mask=mask,
            position_ids=self.family.position_ids(seq_pos, self.rope_offset),
            **self._cache_arg(self.cache),
            cache_position=torch.arange(start, start + q, device=self.device),
            use_cache=True,
            output_hidden_states=hidden,
        )
        return (out.logits[0], out.hidden_states) if hidden else out.logits[0]

    def _forward_static(self, tokens, seq_pos, tail_mask, hidden):
        st, dev = self._static, self.device
        q, start, base = tokens.shape[0], self.cache.length, self.committed
        graphed = self.graphs and st.graphs.usable("decode")
        Q = _bucket(q) if graphed else q
        if start + Q > st.cache.capacity:
            raise RuntimeError(f"static cache overflow: {start} + {Q} > {st.cache.capacity} (room {self.room} too small)")
        # Everything the forward needs goes in one int64 tensor: token ids, cache rows, the committed
        # length, positions and the tail of the mask. A tail width of 0 means causal attention; the
        # mask itself is built on the device (in the graph when graphed) from these, so no host-device
        # sync happens before the logits are read.
        T = start - base + q
        W = 0 if tail_mask is None else (_bucket(T) if graphed else T)
        seq = torch.cat([seq_pos, seq_pos[-1:].expand(Q - q)])
        pos = self.family.position_ids(seq, self.rope_offset)
        n = 2 * Q + 1 + pos.numel() + Q * W + Q
        host = torch.zeros(n, dtype=torch.long)
        host[Q : 2 * Q] = torch.arange(start, start + Q)
        host[2 * Q] = base
        # Token ids, positions (the sequence positions last, without the rope offset: sliding windows
        # measure these) and the tail mask: what is on the host travels in one host-to-device copy,
        # what a drafter left on the device (its chain's tokens, its tree) is copied there after it.
        tail = 2 * Q + 1 + pos.numel()
        pieces = [(lambda b: b[:q], tokens), (lambda b: b[2 * Q + 1 : tail], pos.reshape(-1)), (lambda b: b[n - Q :], seq)]
        if W:
            pieces.append((lambda b: b[tail : n - Q].view(Q, W)[:q, :T], tail_mask))
        for at, x in pieces:
            if x.device.type == "cpu":
                at(host).copy_(x)
        packed = to_device(host, dev)
        for at, x in pieces:
            if x.device.type != "cpu":
                at(packed).copy_(x)
        layout = (Q, tuple(pos.shape), W)
        logits, hs = self._replay(st, hidden, layout, packed) if graphed else self._run(st, hidden, layout, packed)
        self.cache.length = start + q
        logits = logits[0, :q]
        return (logits, tuple(h[:, :q] for h in hs)) if hidden else logits

    def _run(self, st: _Static, hidden: bool, layout, packed: torch.Tensor):
        """One model call from the packed inputs (also the body of a captured graph)."""
        Q, pos_shape, W = layout
        ids, rows, base = packed[:Q].view(1, Q), packed[Q : 2 * Q], packed[2 * Q]
        n_pos = math.prod(pos_shape)
        pos = packed[2 * Q + 1 : 2 * Q + 1 + n_pos].view(pos_shape)
        cols = st.cols.unsqueeze(0)
        if W == 0:
            allowed = cols <= rows.unsqueeze(1)
        else:  # committed columns, then the tail columns base..base+W-1 as the tail mask says
            tail = packed[2 * Q + 1 + n_pos : -Q].view(Q, W) != 0
            rel = cols - base
            in_tail = tail.gather(1, rel.clamp(0, W - 1).expand(Q, -1))
            allowed = (rel < 0) | (in_tail & (rel < W))
        seq = packed[-Q:]
        dist = None
        if self.windows is not None:  # committed rows sit at their own index, tail rows where they were fed
            st.key_pos.index_copy_(0, rows, seq)
            dist = seq.unsqueeze(1) - torch.where(cols < base, cols, st.key_pos.unsqueeze(0))
        st.cache.write_pos = rows
        out = self.model(input_ids=ids, attention_mask=self._masks(allowed, dist), position_ids=pos, **self._cache_arg(st.cache),
                         cache_position=rows, use_cache=True, output_hidden_states=hidden)
        return out.logits, (out.hidden_states if hidden else None)

    def _replay(self, st: _Static, hidden: bool, layout, packed: torch.Tensor):
        return self._graph(st, (layout, hidden), lambda buf: self._run(st, hidden, layout, buf), (packed,))

    def _graph(self, st: _Static, key, body, inputs: tuple, kind: str = "decode"):
        return graphs.replay(st.graphs, key, body, inputs, kind, self._capturing)

    @contextmanager
    def _capturing(self):
        # transformers' input checks (e.g. image tokens vs image features) read a device value on
        # the host; the first warm-up run made them on these very inputs.
        with graphs.env("TRANSFORMERS_DISABLE_TORCH_CHECK", "1"), self.family.graph_capture(self.model):
            yield

    @torch.inference_mode()
    def draft_chain(self, first: torch.Tensor, depth: int, sampling: Sampling, noise: torch.Tensor | None):
        """`depth` tokens drafted one after another after the committed prefix, all on the device:
        each picked from q = draft_probs(logits) (argmax, or Gumbel-max with `noise` [depth, V] of
        uniform draws: a sample of q) and fed straight back. first: logits [V] after the last
        committed token. On CUDA the whole chain is one graph (one launch for depth - 1 forwards).
        Returns the tokens [depth], their q [depth] and the q rows [depth, V]; the rows fed stay
        uncommitted."""
        st, start = self._static, self.cache.length
        if st is None or start != self.committed:
            raise RuntimeError("draft_chain needs the static fast path and no uncommitted rows")
        if start + depth > st.cache.capacity:
            raise RuntimeError(f"static cache overflow: {start} + {depth} > {st.cache.capacity}")
        ints = to_device(torch.tensor([start, start + self.rope_offset]), self.device)
        if noise is not None:
            noise = noise if noise.device == self.device else to_device(noise, self.device)
        inputs = (ints, first, noise)
        body = lambda *bufs: self._chain_body(st, depth, sampling, *bufs)  # noqa: E731
        graphed = self.graphs and st.graphs.usable("decode")
        out = self._graph(st, ("chain", depth, sampling, noise is None), body, inputs) if graphed else body(*inputs)
        self.cache.length = start + depth - 1
        return out

    def _chain_body(self, st: _Static, depth: int, sampling: Sampling, ints, first, noise):
        row0, seq0 = ints[0], ints[1]  # first cache row to write; its rope position (offset included)
        cols = st.cols.unsqueeze(0)
        logits, tokens, probs, rows = first, [], [], []
        for d in range(depth):
            q = draft_probs(logits.unsqueeze(0), sampling)[0]
            token, q_token = device_tree.draw(q, None if noise is None else noise[d])
            tokens.append(token)
            probs.append(q_token)
            rows.append(q)
            if d + 1 < depth:
                row = (row0 + d).view(1)
                st.cache.write_pos = row
                out = self.model(input_ids=token.view(1, 1), attention_mask=self._masks(cols <= row.unsqueeze(1), row - cols),
                                 position_ids=self.family.position_ids((seq0 + d).view(1), 0),
                                 **self._cache_arg(st.cache), cache_position=row, use_cache=True)
                logits = out.logits[0, -1]
        return torch.cat(tokens), torch.cat(probs), torch.stack(rows)

    @torch.inference_mode()
    def draft_tree(self, first: torch.Tensor, spec, sampling: Sampling, noise: torch.Tensor | None):
        """An EAGLE-2 dynamic tree (`spec`) drafted after the committed prefix, all on the device
        (`mmspec.device_tree`; one CUDA graph on a GPU). first: logits [V] after the last committed
        token. Returns the `DeviceTree`; the rows fed stay uncommitted."""
        st, start = self._static, self.cache.length
        if st is None or start != self.committed:
            raise RuntimeError("draft_tree needs the static fast path and no uncommitted rows")
        if start + device_tree.tree_rows(spec) > st.cache.capacity:
            raise RuntimeError(f"static cache overflow: {start} + {device_tree.tree_rows(spec)} > {st.cache.capacity}")
        ints = to_device(torch.tensor([start, start + self.rope_offset]), self.device)
        if noise is not None:
            noise = noise if noise.device == self.device else to_device(noise, self.device)
        body = lambda *bufs: self._tree_body(st, spec, sampling, *bufs)  # noqa: E731
        graphed = self.graphs and st.graphs.usable("decode")
        inputs = (ints, first, noise)
        out = self._graph(st, ("tree", spec, sampling, noise is None), body, inputs) if graphed else body(*inputs)
        self.cache.length = start + device_tree.tree_rows(spec)
        return out

    def _tree_body(self, st: _Static, spec, sampling: Sampling, ints, first, noise):
        row0, seq0 = ints[0], ints[1]  # first free cache row; the root's rope position (offset included)

        def expand(depth, tokens, _feeds, rows, allowed):
            seq = (row0 - 1 + depth).expand(rows.shape)  # sequence position of the frontier nodes
            dist = None
            if self.windows is not None:  # committed rows sit at their own index, tree rows at their depth
                st.key_pos.index_copy_(0, rows, seq)
                dist = seq.unsqueeze(1) - torch.where(st.cols < row0, st.cols, st.key_pos).unsqueeze(0)
            st.cache.write_pos = rows
            out = self.model(input_ids=tokens.view(1, -1), attention_mask=self._masks(allowed, dist),
                             position_ids=self.family.position_ids((seq0 - 1 + depth).expand(rows.shape), 0),
                             **self._cache_arg(st.cache), cache_position=rows, use_cache=True)
            return draft_probs(out.logits[0], sampling), _feeds

        root_q = draft_probs(first.unsqueeze(0), sampling)[0]
        return device_tree.grow(expand, root_q, torch.zeros(1, device=first.device), spec, row0, st.cols, noise)

    @property
    def length(self) -> int:
        return kvcache.cache_len(self.cache)

    @torch.inference_mode()
    def commit_rows(self, rows: list[int]) -> None:
        """Keep these rows of the uncommitted tail (in order) and make them committed."""
        kvcache.keep_rows(self.cache, self.committed, rows)
        self.committed += len(rows)
        self._tail_pos = []

    @torch.inference_mode()
    def rollback(self) -> None:
        """Drop every uncommitted entry."""
        kvcache.crop(self.cache, self.committed)
        self._tail_pos = []
