"""Model-family adapters: the one place that knows how a family wants its inputs, positions and masks.

An adapter builds the processor (PIL image processing, no video processor: torchvision is not a
requirement), turns (image, prompt) into prefill inputs, names the media placeholder tokens, maps
sequence indices of new tokens to the `position_ids` the model expects, and says which attention
the model needs beyond plain causal:
- bidirectional blocks in the prompt (Gemma3's image tokens, PaliGemma's whole prefix);
- sliding windows (Gemma3, Aya Vision's Cohere2, Mistral with a window), applied by mmspec's own
  masks over a cache that keeps every row, so rolling back and keeping tree rows stay exact.
Families whose cache cannot be rolled back exactly (linear attention / recurrent state) and model
types without an adapter are refused at load (`family_for`); `--family NAME` forces an adapter.

Positions: 1-D families use the sequence index (PaliGemma: index + 1). M-RoPE families (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, GLM-4.1V) give image tokens (t, h, w) positions from the model's own
`get_rope_index`; text after the image sits at index + rope_delta on all three axes.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image

from mmspec.errors import InputError

# Cache layer kinds whose rows mmspec can crop and reorder exactly (a window is a mask, not an eviction).
EXACT_LAYERS = {"full_attention", "sliding_attention"}


def chat_messages(prompt: str, with_image: bool) -> list[dict[str, Any]]:
    content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _no_video_processor(cls):
    """The family's own processor class, built from a tokenizer and the PIL image processor, with no
    video processor (the video processors need torchvision)."""

    class PilProcessor(cls):
        @classmethod
        def _get_arguments_from_pretrained(klass, where, processor_dict=None, **kwargs):
            from transformers import AutoImageProcessor, AutoTokenizer

            args = []
            for attr in klass.get_attributes():
                if "video" in attr:
                    args.append(None)
                elif "tokenizer" in attr:
                    args.append(AutoTokenizer.from_pretrained(where))
                elif attr == "image_processor":
                    args.append(AutoImageProcessor.from_pretrained(where, backend="pil"))
                else:
                    raise InputError(f"{cls.__name__} needs a {attr}, which mmspec does not load")
            return args

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    PilProcessor.__name__ = cls.__name__
    return PilProcessor


def _processor_class(name: str):
    """The processor class called `name`. A processing module that imports its torchvision image
    processor only to borrow a helper (Pixtral) is imported with the PIL image processor module,
    which defines the same helpers, standing in for the torchvision one."""
    import importlib
    import sys

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    cls = processor_class_from_name(name)
    if cls is not None and type(cls).__name__ != "DummyObject":
        return cls
    for model_type in (t for t, n in PROCESSOR_MAPPING_NAMES.items() if n == name):
        package = f"transformers.models.{model_type_to_module_name(model_type)}"
        short = package.rsplit(".", 1)[1]
        tv, pil = f"{package}.image_processing_{short}", f"{package}.image_processing_pil_{short}"
        try:
            importlib.import_module(tv)
            continue  # torchvision is importable after all: the mapping's class is the real one
        except ModuleNotFoundError as e:
            if "torchvision" not in str(e):
                raise
        sys.modules[tv] = importlib.import_module(pil)
        try:
            module = importlib.import_module(f"{package}.processing_{short}")
        finally:
            del sys.modules[tv]
        return getattr(module, name)
    raise InputError(f"{name} needs torchvision, which mmspec does not require; install torchvision to use it")


def _processor_class_name(where: str, model_type: str) -> str | None:
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for file in ("processor_config.json", "preprocessor_config.json"):
        path = Path(where) / file
        if path.exists():
            name = json.loads(path.read_text()).get("processor_class")
            if name:
                return name
    return PROCESSOR_MAPPING_NAMES.get(model_type)


class Family:
    name = "base"
    model_types: tuple[str, ...] = ()
    sees_image = True

    # --- processor and prompt

    def load_processor(self, where: str, config):
        name = _processor_class_name(where, config.model_type)
        cls = _processor_class(name) if name else None
        if cls is None:
            raise InputError(f"no processor class is known for {config.model_type} in {where}")
        return _no_video_processor(cls).from_pretrained(where)

    def prompt_text(self, processor, prompt: str, with_image: bool) -> str:
        return processor.apply_chat_template(chat_messages(prompt, with_image), add_generation_prompt=True, tokenize=False)

    def prefill_inputs(self, processor, image: Image.Image | None, prompt: str) -> dict[str, torch.Tensor]:
        with_image = image is not None and self.sees_image
        text = self.prompt_text(processor, prompt, with_image)
        if with_image:
            out = dict(processor(images=image, text=text, return_tensors="pt"))
        else:
            tok = getattr(processor, "tokenizer", processor)
            out = dict(tok(text, return_tensors="pt", add_special_tokens=False))
        out.pop("labels", None)  # a loss target (PaliGemma's processor makes one): never a forward input
        return out

    def media_token_ids(self, config) -> frozenset[int]:
        """The placeholder ids that the processor expands into image (or video) features."""
        keys = ("image_token_id", "image_token_index", "video_token_id", "image_token_ids")
        ids = set()
        for key in keys:
            value = getattr(config, key, None)
            ids.update(value if isinstance(value, (list, tuple)) else [value])
        return frozenset(i for i in ids if i is not None)

    # --- positions

    def rope_offset(self, model, inputs: dict[str, torch.Tensor]) -> int:
        return 0

    def prefill_position_ids(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None  # let the model derive them

    def position_ids(self, seq_pos: torch.Tensor, offset: int) -> torch.Tensor:
        return (seq_pos + offset).unsqueeze(0)

    # --- attention

    def prefill_blocks(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[P] block ids of the prompt: tokens of one block >= 0 see each other both ways; -1 = causal."""
        return None

    def windows(self, config) -> dict[str, int | None] | None:
        """The attention masks the decoder takes: None = one causal tensor; otherwise mask name ->
        sliding window (None: full). The name "" means one tensor with that window for every layer."""
        cfg = text_config(config)
        types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        if types is not None:
            if "sliding_attention" not in types:
                return None
            return {"full_attention": None, "sliding_attention": window}
        if window is not None and getattr(cfg, "use_sliding_window", True):
            return {"": window}
        return None

    @contextmanager
    def graph_capture(self, model) -> Iterator[None]:
        """Held while a CUDA graph of this family's forward is captured (and test-run before it)."""
        yield


def check_rollback(config) -> None:
    """Refuse a model whose cache mmspec cannot roll back exactly (whatever adapter would take it)."""
    cfg = text_config(config)
    other = sorted(set(getattr(cfg, "layer_types", None) or ()) - EXACT_LAYERS)
    if other:
        raise InputError(
            f"{config.model_type} has {', '.join(other)} layers, whose state (linear attention / recurrent) "
            "cannot be rolled back to a draft's accepted prefix exactly; mmspec refuses it")


# Text decoders whose attention entropy.py rebuilds exactly: q = rotary(q_proj(input_layernorm(h))),
# scores against the cached keys with a causal mask (no query norm, no window, no interleaved rotary).
RECOMPUTABLE_DECODERS = {"llama", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "mistral", "gemma"}


def attention_recompute_problem(config) -> str | None:
    """Why entropy.py cannot recompute this model's attention (None: it can)."""
    cfg = text_config(config)
    kind = getattr(cfg, "model_type", "")
    if kind not in RECOMPUTABLE_DECODERS:
        return f"its {kind} decoder's attention (query norm, softcapping or rotary layout) is not rebuilt by mmspec"
    if FAMILIES[0].windows(config) is not None:
        return "its sliding-window layers are not rebuilt by mmspec"
    return None


def attention_masks(windows: dict[str, int | None] | None, allowed: torch.Tensor, dist: torch.Tensor, additive):
    """The decoder's attention_mask from `allowed` [q, K] (bool) and `dist` [q, K] (query position minus
    key position): a windowed mask hides keys `window` or more positions back, as transformers' does."""
    if windows is None:
        return additive(allowed)
    masks = {name: additive(allowed if w is None else allowed & (dist < w)) for name, w in windows.items()}
    return masks[""] if "" in masks else masks


class LlavaFamily(Family):
    """1-D positions; image features scattered into the placeholder tokens (get_placeholder_mask)."""

    name = "llava"
    model_types = ("llava", "llava_next", "llava_onevision", "idefics3", "mistral3", "aya_vision", "internvl")

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


class SmolVLMFamily(LlavaFamily):
    name = "smolvlm"
    model_types = ("smolvlm",)

    def prompt_text(self, processor, prompt, with_image):
        # SmolVLM's apply_chat_template only adds video defaults, read from the video processor we
        # do not load; the shared template rendering underneath is what an image prompt needs.
        from transformers.processing_utils import ProcessorMixin

        return ProcessorMixin.apply_chat_template(processor, chat_messages(prompt, with_image),
                                                  add_generation_prompt=True, tokenize=False)


class Gemma3Family(LlavaFamily):
    """Image tokens see their whole image both ways (in the prompt only); sliding-window layers."""

    name = "gemma3"
    model_types = ("gemma3",)

    def prefill_blocks(self, inputs):
        types = inputs.get("token_type_ids")
        if types is None:
            return None
        image = types[0] == 1
        start = image & ~torch.cat([image.new_zeros(1), image[:-1]])
        return torch.where(image, start.long().cumsum(0) - 1, -1)


class PaliGemmaFamily(LlavaFamily):
    """Prefix-LM: the whole prompt (image + text) sees itself both ways; positions start at 1; no chat template."""

    name = "paligemma"
    model_types = ("paligemma",)

    def prompt_text(self, processor, prompt, with_image):
        return prompt

    def prefill_inputs(self, processor, image, prompt):
        if image is None or not self.sees_image:
            raise InputError("PaliGemma needs an image with every prompt")
        out = dict(processor(images=image, text=prompt, return_tensors="pt"))
        out.pop("labels", None)
        return out

    def rope_offset(self, model, inputs):
        return 1

    def prefill_position_ids(self, model, inputs):
        return self.position_ids(torch.arange(inputs["input_ids"].shape[1]), 1)

    def prefill_blocks(self, inputs):
        # As transformers does: the prefix is where the processor's token_type_ids are 0; without
        # them the model runs causally, and so do we.
        types = inputs.get("token_type_ids")
        return None if types is None else torch.where(types[0] == 0, 0, -1)


class TextFamily(Family):
    name = "text"
    sees_image = False

    def load_processor(self, where, config):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(where)


class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v")

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


FAMILIES: tuple[Family, ...] = (LlavaFamily(), Qwen2VLFamily(), SmolVLMFamily(), Gemma3Family(), PaliGemmaFamily(),
                                TextFamily())
BY_NAME = {fam.name: fam for fam in FAMILIES}


def family_for(config, name: str | None = None) -> Family:
    """The adapter for a transformers config, or the one named (`--family`); refuses what is not exact."""
    model_type = getattr(config, "model_type", "")
    check_rollback(config)
    if name is not None:
        if name not in BY_NAME:
            raise InputError(f"unknown family {name!r}: use one of {', '.join(BY_NAME)}")
        fam = BY_NAME[name]
    else:
        fam = next((f for f in FAMILIES if model_type in f.model_types), None)
        if fam is None and not hasattr(config, "vision_config"):
            fam = BY_NAME["text"]
        if fam is None:
            raise InputError(f"model type {model_type!r} has no mmspec family adapter (known: "
                             f"{', '.join(t for f in FAMILIES for t in f.model_types)}); "
                             "--family NAME forces one at your own risk")
    return fam
