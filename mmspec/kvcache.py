"""KV-cache bookkeeping over Hugging Face `DynamicCache`: length, crop, keep the accepted path.

After a verify forward the cache holds the committed prefix plus every tree node; `keep_rows`
moves the accepted rows down next to the prefix in place and drops the rest, so accepted tokens
are never recomputed.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache(model) -> DynamicCache:
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _layers(cache: DynamicCache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError("mmspec needs a transformers version whose DynamicCache has .layers (>= 4.56)")
    return [layer for layer in layers if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0]


def cache_len(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def crop(cache: DynamicCache, length: int) -> None:
    for layer in _layers(cache):
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def keep_rows(cache: DynamicCache, base: int, rows: list[int]) -> None:
    """Keep cache[:base] and then the new entries base + rows (in that order); drop the rest."""
    if rows == list(range(len(rows))):
        crop(cache, base + len(rows))
        return
    layers = _layers(cache)
    if not layers:
        return
    idx = torch.tensor(rows, dtype=torch.long) + base
    end = base + len(rows)
    for layer in layers:  # layers of a model split over devices live on different devices
        idx = idx.to(layer.keys.device)
        layer.keys[..., base:end, :] = layer.keys.index_select(-2, idx)
        layer.values[..., base:end, :] = layer.values.index_select(-2, idx)
        layer.keys = layer.keys[..., :end, :]
        layer.values = layer.values[..., :end, :]
