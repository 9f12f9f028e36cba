"""KV-cache bookkeeping: length, crop, keep the accepted path; dynamic and preallocated caches.

Two kinds of cache go through the same three functions (`cache_len`, `crop`, `keep_rows`):
Hugging Face's `DynamicCache` (grows by concatenation; any device, split models included) and
`StaticKV`, one preallocated buffer pair per layer written in place at `write_pos`, whose fixed
tensor addresses let a CUDA graph replay a forward (see model.py). After a verify forward the
cache holds the committed prefix plus every tree node; `keep_rows` moves the accepted rows down
next to the prefix in place and drops the rest, so accepted tokens are never recomputed. Both
kinds keep every row of sliding-window layers too (the window is a mask, see families.py), so
cropping and keeping rows is the same operation on every layer.
`to_device` is the fast path's one way of moving small host tensors (indices, packed inputs) to
the GPU without a sync.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a sync: on CUDA through pinned memory, whose caching
    allocator keeps the block until the asynchronous copy is done."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class _Rows:
    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class StaticKV:
    """Preallocated K/V of `capacity` positions per layer. Rows at and beyond `length` are stale:
    attention must mask them (model.py always passes a full [q, capacity] mask with this cache).

    It speaks the part of the transformers cache protocol a decoder layer uses (`update`,
    `get_seq_length`), not the whole `Cache` class, whose layer API changes between versions.
    """

    def __init__(self, capacity: int, n_layers: int | None = None):
        self.capacity = capacity
        self.n_layers = n_layers
        self.layers: list[_Rows] = []
        self.length = 0
        self.write_pos: torch.Tensor | None = None  # [q] cache rows the next forward writes
        # With n_layers known and every layer alike, all K/V live in one [L, 2, b, h, capacity, d]
        # tensor (layers hold views): accepting tree rows is then one gather and one copy, not 4 per layer.
        self.stack: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(_Rows())
        layer = self.layers[layer_idx]
        if layer.keys is None:  # allocated at the prefill, on the layer's own device and dtype
            b, h, _, d = key_states.shape
            shape = (b, h, self.capacity, d)
            if layer_idx == 0 and self.n_layers and value_states.shape == key_states.shape:
                self.stack = key_states.new_zeros(self.n_layers, 2, *shape)
            if self.stack is not None and layer_idx < self.n_layers and self.stack.shape[2:] == shape \
                    and self.stack.dtype == key_states.dtype and self.stack.device == key_states.device:
                layer.keys, layer.values = self.stack[layer_idx, 0], self.stack[layer_idx, 1]
            else:
                self.stack = None  # an unlike layer: per-layer buffers and per-layer row moves
                layer.keys = key_states.new_zeros(*shape)
                layer.values = value_states.new_zeros(b, h, self.capacity, value_states.shape[-1])
        pos = self.write_pos.to(layer.keys.device)
        layer.keys.index_copy_(2, pos, key_states)
        layer.values.index_copy_(2, pos, value_states)
        return layer.keys, layer.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    @property
    def is_initialized(self) -> bool:  # PaliGemma asks, to tell its prefill from later forwards
        return bool(self.layers)


def new_cache(model) -> DynamicCache:
    """A cache of full layers only, also for a model with sliding-window layers: transformers'
    sliding layers drop rows past the window as they go, so a rollback could not restore them.
    The window is applied by the attention mask instead (families.attention_masks)."""
    return DynamicCache()


def _layers(cache: DynamicCache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError("mmspec needs a transformers version whose DynamicCache has .layers (>= 4.56)")
    return [layer for layer in layers if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0]


def cache_len(cache: DynamicCache | StaticKV) -> int:
    return cache.get_seq_length()


def crop(cache: DynamicCache | StaticKV, length: int) -> None:
    if isinstance(cache, StaticKV):
        cache.length = length
        return
    for layer in _layers(cache):
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def keep_rows(cache: DynamicCache | StaticKV, base: int, rows: list[int]) -> None:
    """Keep cache[:base] and then the new entries base + rows (in that order); drop the rest."""
    end = base + len(rows)
    if rows == list(range(len(rows))):
        crop(cache, end)
        return
    static = isinstance(cache, StaticKV)
    if static and cache.stack is not None and len(cache.layers) == cache.n_layers:
        stack = cache.stack
        stack[..., base:end, :] = stack.index_select(-2, to_device(torch.tensor(rows) + base, stack.device))
        cache.length = end
        return
    layers = [layer for layer in cache.layers if layer.keys is not None] if static else _layers(cache)
    idx = torch.tensor(rows, dtype=torch.long) + base
    for layer in layers:  # layers of a model split over devices live on different devices
        idx = idx.to(layer.keys.device)
        layer.keys[..., base:end, :] = layer.keys.index_select(-2, idx)
        layer.values[..., base:end, :] = layer.values.index_select(-2, idx)
        if not static:  # a static buffer keeps its address (CUDA graphs captured it); rows past length are stale
            layer.keys = layer.keys[..., :end, :]
            layer.values = layer.values[..., :end, :]
    if static:
        cache.length = end
