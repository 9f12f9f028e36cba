"""`CachedModel`: one Hugging Face model, its KV cache and its family adapter.

The target and every model-based drafter go through it: a prefill with the processor's full output,
then forwards of new token ids only, with per-token positions and a tree attention mask. The cache
holds `committed` entries that every new token sees, plus uncommitted entries (tree nodes fed so
far) that a new token sees only where `tail_mask` says so.
"""
from __future__ import annotations

import torch

from mmspec import kvcache
from mmspec.families import Family


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


class CachedModel:
    def __init__(self, model, family: Family):
        self.model = model
        self.family = family
        self.device = execution_device(model)
        self.dtype = model.dtype
        self.cache = None
        self.committed = 0  # cache entries every new token attends to
        self.rope_offset = 0

    @torch.inference_mode()
    def prefill(self, inputs: dict[str, torch.Tensor], hidden: bool = False):
        """Run the prompt; returns the last position's logits [V] (and hidden states if asked)."""
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        self.cache = kvcache.new_cache(self.model)
        self.rope_offset = self.family.rope_offset(self.model, inputs)
        pos = self.family.prefill_position_ids(self.model, inputs)
        if pos is not None:
            inputs["position_ids"] = pos
        out = self.model(**inputs, past_key_values=self.cache, use_cache=True, output_hidden_states=hidden, logits_to_keep=1)
        self.committed = kvcache.cache_len(self.cache)
        return (out.logits[0, -1], out.hidden_states) if hidden else out.logits[0, -1]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, seq_pos: torch.Tensor, tail_mask: torch.Tensor | None, hidden: bool = False):
        """Feed `tokens` [q] at sequence positions `seq_pos` [q]; returns logits [q, V].

        tail_mask [q, T] (bool) says which uncommitted cache entries plus new tokens each token sees
        (T = uncommitted + q); None means plain causal attention.
        """
        q = tokens.shape[0]
        start = kvcache.cache_len(self.cache)
        mask = None
        if tail_mask is not None:
            total = start + q
            allowed = torch.ones(q, total, dtype=torch.bool, device=self.device)
            allowed[:, self.committed :] = tail_mask.to(self.device)
            mask = torch.zeros(1, 1, q, total, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        pos = self.family.position_ids(seq_pos.to(self.device), self.rope_offset)
        out = self.model(
            input_ids=tokens.to(self.device).unsqueeze(0),
            attention_mask=mask,
            position_ids=pos,
            past_key_values=self.cache,
            cache_position=torch.arange(start, start + q, device=self.device),
            use_cache=True,
            output_hidden_states=hidden,
        )
        return (out.logits[0], out.hidden_states) if hidden else out.logits[0]

    @property
    def length(self) -> int:
        return kvcache.cache_len(self.cache)

    @torch.inference_mode()
    def commit_rows(self, rows: list[int]) -> None:
        """Keep these rows of the uncommitted tail (in order) and make them committed."""
        kvcache.keep_rows(self.cache, self.committed, rows)
        self.committed += len(rows)

    @torch.inference_mode()
    def rollback(self) -> None:
        """Drop every uncommitted entry."""
        kvcache.crop(self.cache, self.committed)
