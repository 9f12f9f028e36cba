"""CUDA-graph capture and replay, shared by the target's fast path (`model.CachedModel`) and the
feature drafters' device loops (`mmspec.drafters.feature.drafter`).

A `GraphTable` belongs to one set of static buffers: its graphs read and write those buffers'
addresses, so the table lives and dies with them. `replay(table, key, body, inputs)` captures
`body(*inputs)` on the first use of `key` and replays it afterwards; a body that cannot be captured
runs eagerly, with one warning, and graphs of that kind stay off for the table.
"""
from __future__ import annotations

import math
import os
import weakref
import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch


class GraphTable:
    def __init__(self, device: torch.device):
        # key -> (graph, input buffers, outputs)
        self.captured: dict = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.graph_error: dict[str, str] = {}  # kind (e.g. "prefill", "decode") -> why capture failed

    def usable(self, kind: str) -> bool:
        return kind not in self.graph_error


@contextmanager
def env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@contextmanager
def sync_errors():
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def cloned(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    return tuple(cloned(y) for y in x) if isinstance(x, tuple) else x


def replay(table: GraphTable, key, body: Callable, inputs: tuple, kind: str = "decode",
           capturing: Callable = nullcontext):
    """body(*inputs) replayed from a CUDA graph captured on first use of `key` (inputs are copied
    into the graph's own buffers). `capturing()` is a context entered around the captured runs
    (a family's capture quirks)."""
    entry = table.captured.get(key)
    if entry is None:
        try:
            entry = table.captured[key] = _capture(table, body, inputs, capturing)
        except Exception as e:  # noqa: BLE001 - a body that cannot be captured still runs
            table.graph_error[kind] = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA graph capture ({kind}) failed, running it eagerly: {table.graph_error[kind]}",
                          stacklevel=2)
            return body(*inputs)
    graph, bufs, outputs = entry
    for buf, new in zip(bufs, inputs):
        if buf is not None:
            buf.copy_(new)
    graph.replay()
    # Outputs live in the graph's memory pool, which the next replay overwrites.
    return cloned(outputs)


def _capture(table: GraphTable, body: Callable, inputs: tuple, capturing: Callable):
    bufs = tuple(x.clone() if x is not None else None for x in inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (lazy inits, kernel selection)
        body(*bufs)  # with every input check of the model on
        # Then as it will be captured, with host syncs made errors: an op that would break the
        # capture raises here, harmlessly; a capture that fails half-way can leave the CUDA
        # allocator and RNG unusable for the rest of the process.
        with capturing(), sync_errors():
            body(*bufs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capturing(), torch.cuda.graph(graph, pool=table.pool):
        outputs = body(*bufs)
    return graph, bufs, outputs


class BufferPool:
    """Preallocated per-network drafter buffers, leased for one request and handed back by `finish`.
    CUDA graphs captured over a lease hold its addresses, so reusing leases reuses their graphs.
    `make(owner, cap, device, dtype)` builds one (with `cap`, `device`, `dtype` and `copy_from(old)`);
    sizes are rounded up to 256 rows so that later prompts fit."""

    def __init__(self, make: Callable):
        self._make = make
        self._free: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def lease(self, owner, rows: int, device: torch.device, dtype: torch.dtype):
        free = self._free.setdefault(owner, [])
        # Buffers of another device or dtype are dropped: the network moved or was cast since (training casts it).
        free[:] = [buf for buf in free if (buf.device, buf.dtype) == (device, dtype)]
        for i, buf in enumerate(free):
            if buf.cap >= rows:
                return free.pop(i)
        return self._make(owner, -(-rows // 256) * 256, device, dtype)

    def give_back(self, owner, buf) -> None:
        if buf is not None:
            self._free.setdefault(owner, []).append(buf)

    def grown(self, owner, old, rows: int):
        """`old` if it has room for `rows`, else a larger lease holding what `old` held (old is given
        back; graphs are captured anew for the new one, which on the fast path is rare)."""
        if rows <= old.cap:
            return old
        new = self.lease(owner, max(rows, 2 * old.cap), old.device, old.dtype)
        new.copy_from(old)
        self.give_back(owner, old)
        return new


class DeviceNoise:
    """Uniform draws for Gumbel-max sampling of a device-side chain. On a GPU they are drawn there,
    from a generator seeded once per request from the request's generator (reproducible per seed):
    for a real vocabulary, drawing them on the host and copying would cost milliseconds a step."""

    def __init__(self):
        self._gen: torch.Generator | None = None

    def reset(self) -> None:
        self._gen = None

    def uniforms(self, depth: int, vocab: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
        if device.type == "cpu":
            return torch.rand(depth, vocab, generator=gen)
        if self._gen is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            self._gen = torch.Generator(device).manual_seed(seed)
        return torch.rand(depth, vocab, generator=self._gen, device=device)

    def for_draft(self, spec, sampling, vocab: int, device: torch.device, gen: torch.Generator) -> torch.Tensor | None:
        """The uniforms one device-drafted step of `spec` reads: [depth, vocab] for a chain, [depth,
        topk, vocab] for a dynamic tree; None when greedy or when nothing is drafted (kind "none")."""
        if spec.kind == "none" or sampling.greedy:
            return None
        shape = (spec.depth, spec.topk) if spec.kind == "dynamic" else (spec.depth,)
        return self.uniforms(math.prod(shape), vocab, device, gen).view(*shape, vocab)


def run_body(table: GraphTable, graphed: bool, key, body: Callable, inputs: tuple):
    """body(*inputs), replayed from the table's CUDA graph for `key` when `graphed` (and decode
    graphs still work for this table), else run eagerly: the same body either way."""
    if graphed and table.usable("decode"):
        return replay(table, key, body, inputs)
    return body(*inputs)
