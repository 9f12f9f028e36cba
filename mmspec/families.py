"""Model-family adapters: the only place that knows how a family wants its prompt and positions.

A family turns (image, prompt) into prefill inputs with the processor, and maps sequence indices of
new tokens to the `position_ids` the model expects. Adding a family = adding one small class here
and listing it in `FAMILIES`.
- llava: 1-D positions (position = index in the sequence). Also fits other 1-D VLMs.
- qwen2_vl: 3-D M-RoPE. Image tokens get (t, h, w) positions, so text after the image sits at
  index + rope_delta on all three axes; the delta comes from the model's own `get_rope_index`.
- text: a causal LM that never sees the image (a text-only drafter).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from PIL import Image


def chat_messages(prompt: str, with_image: bool) -> list[dict[str, Any]]:
    content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


class Family:
    name = "base"
    model_types: tuple[str, ...] = ()
    sees_image = True

    def prefill_inputs(self, processor, image: Image.Image | None, prompt: str) -> dict[str, torch.Tensor]:
        with_image = image is not None and self.sees_image
        text = processor.apply_chat_template(chat_messages(prompt, with_image), add_generation_prompt=True, tokenize=False)
        if with_image:
            return dict(processor(images=image, text=text, return_tensors="pt"))
        tok = getattr(processor, "tokenizer", processor)
        return dict(tok(text, return_tensors="pt", add_special_tokens=False))

    def rope_offset(self, model, inputs: dict[str, torch.Tensor]) -> int:
        return 0

    def prefill_position_ids(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None  # let the model derive them

    def position_ids(self, seq_pos: torch.Tensor, offset: int) -> torch.Tensor:
        return (seq_pos + offset).unsqueeze(0)

    @contextmanager
    def graph_capture(self, model) -> Iterator[None]:
        """Held while a CUDA graph of this family's forward is captured (and test-run before it)."""
        yield


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava", "llava_next", "idefics3", "smolvlm", "gemma3", "paligemma", "mistral3")

    @contextmanager
    def graph_capture(self, model) -> Iterator[None]:
        # transformers' get_placeholder_mask formats the device-side image-token count into its
        # error message even when the check passes: a host sync, which a capture forbids. The
        # prefill's first, eager run keeps the check; the capture uses the bare mask.
        inner = getattr(model, "model", None)
        token = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
        if inner is None or token is None or not hasattr(inner, "get_placeholder_mask"):
            yield
            return
        inner.get_placeholder_mask = lambda input_ids, inputs_embeds, image_features: (input_ids == token).unsqueeze(-1)
        try:
            yield
        finally:
            del inner.get_placeholder_mask


class TextFamily(Family):
    name = "text"
    sees_image = False


class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def _rope_index(self, model, inputs):
        inner = model.model if hasattr(model.model, "get_rope_index") else model
        kwargs = {k: inputs[k] for k in ("image_grid_thw", "attention_mask", "mm_token_type_ids") if k in inputs}
        return inner.get_rope_index(inputs["input_ids"], **kwargs)

    def rope_offset(self, model, inputs):
        if "image_grid_thw" not in inputs:
            return 0
        _, deltas = self._rope_index(model, inputs)
        return int(deltas.reshape(-1)[0])

    def prefill_position_ids(self, model, inputs):
        if "image_grid_thw" not in inputs:
            return None
        pos, _ = self._rope_index(model, inputs)
        return pos

    def position_ids(self, seq_pos, offset):
        return (seq_pos + offset).view(1, 1, -1).expand(3, 1, -1)


FAMILIES: tuple[Family, ...] = (LlavaFamily(), Qwen2VLFamily())


def family_for(config) -> Family:
    """The adapter for a transformers config; unknown VLMs fall back to 1-D positions (llava)."""
    model_type = getattr(config, "model_type", "")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    if hasattr(config, "vision_config"):
        return FAMILIES[0]
    return TextFamily()
