"""Tiny random-initialised models and a locally trained tokenizer, saved with save_pretrained.

Built from configs here (no hub): a LLaVA (1-D positions), a Qwen2-VL (3-D M-RoPE), a second small
LLaVA and a text-only Llama to serve as independent drafters. `peaky=True` scales the LM head so that
distributions are concentrated (sampling tests need few likely tokens).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

CORPUS = [
    "a red square is left of a blue circle and a small green star sits above it",
    "there are three objects in the image: a yellow triangle, a purple heart and a gray hexagon",
    "the large orange diamond in the top left corner carries the word ok",
    "how many shapes can you see? i count two circles and one cross.",
    "describe the image. the background is light blue with faint stripes.",
]
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ image_block }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tokenizer(vocab_size: int = 400, extra: dict | None = None, specials: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens=extra or {"image_token": "<image>"},
    )


def _template(image_block: str) -> str:
    return TEMPLATE.replace("{{ image_block }}", image_block)


def _peak(model, scale: float) -> None:
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)


def build_llava(out: Path, seed: int, layers: int = 2, hidden: int = 64, peaky: float = 1.0, noise: float = 0.0) -> Path:
    """`noise` > 0 perturbs the LM head: a drafter close to, but not equal to, the same-seed target."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512, tie_word_embeddings=False,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    _peak(model, peaky)
    if noise:
        with torch.no_grad():
            w = model.get_output_embeddings().weight
            w.add_(noise * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 99)))
    model.generation_config.eos_token_id = tok.eos_token_id
    proc = LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                          patch_size=8, vision_feature_select_strategy="full", chat_template=_template("<image>"))
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def build_qwen2_vl(out: Path, seed: int, layers: int = 2, hidden: int = 64, peaky: float = 1.0) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"), tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    _peak(model, peaky)
    model.generation_config.eos_token_id = tok.eos_token_id
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2).save_pretrained(out)
    (out / "chat_template.jinja").write_text(_template("<|vision_start|><|image_pad|><|vision_end|>"))
    model.save_pretrained(out)
    return out


def build_text_lm(out: Path, seed: int, layers: int = 1, hidden: int = 48, vocab_size: int = 400) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(vocab_size)
    tok.chat_template = _template("")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------
# One tiny model per family (tests/test_families.py). Each follows its family's own conventions:
# the processor class and placeholder tokens of transformers' processing code, saved the way a hub
# checkpoint is (tokenizer, image processor, processor_config.json naming the processor class,
# chat_template.jinja). No video processor is saved: mmspec never loads one.


def _llama_text(tok, hidden: int, layers: int, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


def _siglip(size: int = 32, patch: int = 8, hidden: int = 32) -> dict:
    return dict(image_size=size, patch_size=patch, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=2 * hidden)


def _save(out: Path, model, tok, image_processor, processor_class: str, template: str, **processor_kwargs) -> Path:
    import json

    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, **processor_kwargs}))
    (out / "chat_template.jinja").write_text(template)
    return out


def build_llava_next(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = build_tokenizer()
    torch.manual_seed(seed)
    grid = [[32, 32], [32, 64], [64, 32]]
    cfg = LlavaNextConfig(vision_config=dict(model_type="siglip_vision_model", **_siglip()),
                          text_config=dict(model_type="llama", **_llama_text(tok, hidden, layers)),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=grid,
                          vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=grid)
    return _save(out, model, tok, ip, "LlavaNextProcessor", _template("<image>"), patch_size=8,
                 vision_feature_select_strategy="full")


def build_llava_onevision(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    tok = build_tokenizer(specials=("<video>",), extra={"image_token": "<image>", "video_token": "<video>"})
    torch.manual_seed(seed)
    grid = [[32, 32], [32, 64], [64, 32]]
    cfg = LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", **_siglip()),
                               text_config=dict(model_type="qwen2", **_llama_text(tok, hidden, layers)),
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=grid,
                               vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=grid)
    return _save(out, model, tok, ip, "LlavaOnevisionProcessor", _template("<image>"), num_image_tokens=16,
                 vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")


def build_qwen2_5_vl(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=_llama_text(tok, hidden, layers, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                       "rope_theta": 10000.0}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
                           window_size=56),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"), tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    return _save(out, model, tok, ip, "Qwen2_5_VLProcessor", _template("<|vision_start|><|image_pad|><|vision_end|>"))


def build_qwen3_vl(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    torch.manual_seed(seed)
    cfg = Qwen3VLConfig(
        text_config=_llama_text(tok, hidden, layers, head_dim=16,
                                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                 "mrope_interleaved": True, "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), tie_word_embeddings=False)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    ip = Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=128 * 128, patch_size=16, merge_size=2)
    return _save(out, model, tok, ip, "Qwen3VLProcessor", _template("<|vision_start|><|image_pad|><|vision_end|>"))


def _idefics_like(out: Path, seed: int, layers: int, hidden: int, kind: str) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    config_cls, model_cls, ip_cls, proc = {
        "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, "Idefics3Processor"),
        "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil, "SmolVLMProcessor"),
    }[kind]
    tok = build_tokenizer(specials=("<fake_token_around_image>", "<global-img>", "<end_of_utterance>"))
    torch.manual_seed(seed)
    cfg = config_cls(vision_config=_siglip(), text_config=dict(model_type="llama", **_llama_text(tok, hidden, layers)),
                     scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    model = model_cls(cfg).eval()
    ip = ip_cls(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    return _save(out, model, tok, ip, proc, _template("<image>"), image_seq_len=4)


def build_idefics3(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    return _idefics_like(out, seed, layers, hidden, "idefics3")


def build_smolvlm(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    return _idefics_like(out, seed, layers, hidden, "smolvlm")


def build_glm4v(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    marks = ("<|image|>", "<|begin_of_image|>", "<|end_of_image|>", "<|video|>", "<|begin_of_video|>", "<|end_of_video|>")
    tok = build_tokenizer(specials=marks, extra={"image_token": "<|image|>", "video_token": "<|video|>"})
    ids = {m: tok.convert_tokens_to_ids(m) for m in marks}
    torch.manual_seed(seed)
    cfg = Glm4vConfig(
        text_config=_llama_text(tok, hidden, layers, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                       "rope_theta": 10000.0, "partial_rotary_factor": 1.0}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           image_size=28, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"], tie_word_embeddings=False)
    model = Glm4vForConditionalGeneration(cfg).eval()
    ip = Glm4vImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14, merge_size=2)
    return _save(out, model, tok, ip, "Glm4vProcessor", _template("<|begin_of_image|><|image|><|end_of_image|>"))


def build_gemma3(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    """Layer 0 slides over an 8-token window (shorter than the prompt), layer 1 is full; the 4 image
    tokens attend to each other both ways."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    marks = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
    tok = build_tokenizer(specials=marks, extra={"boi_token": marks[0], "eoi_token": marks[1], "image_token": marks[2]})
    torch.manual_seed(seed)
    text = _llama_text(tok, hidden, layers, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                       layer_types=(["sliding_attention", "full_attention"] * layers)[:layers])
    cfg = Gemma3Config(text_config=text, vision_config=_siglip(), mm_tokens_per_image=4,
                       boi_token_index=tok.convert_tokens_to_ids(marks[0]), eoi_token_index=tok.convert_tokens_to_ids(marks[1]),
                       image_token_index=tok.convert_tokens_to_ids(marks[2]), tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return _save(out, model, tok, ip, "Gemma3Processor", _template("<start_of_image>"), image_seq_length=4)


def build_paligemma(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from transformers import PaliGemmaProcessor

    tok = build_tokenizer()
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds PaliGemma's location and segmentation tokens
    torch.manual_seed(seed)
    text = dict(model_type="gemma", **_llama_text(tok, hidden, layers, head_dim=16))
    cfg = PaliGemmaConfig(text_config=text, vision_config=_siglip(), image_token_index=tok.convert_tokens_to_ids("<image>"),
                          projection_dim=hidden, hidden_size=hidden, vocab_size=len(tok), tie_word_embeddings=False)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    return _save(out, model, tok, ip, "PaliGemmaProcessor", _template("<image>"))


def build_mistral3(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    """A Mistral text model with a 12-token sliding window (shorter than the prompt)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    marks = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
    tok = build_tokenizer(specials=marks, extra={"image_token": "[IMG]"})
    torch.manual_seed(seed)
    cfg = Mistral3Config(
        text_config=dict(model_type="mistral", **_llama_text(tok, hidden, layers, head_dim=16, sliding_window=12)),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8, head_dim=16),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, tie_word_embeddings=False)
    model = Mistral3ForConditionalGeneration(cfg).eval()
    ip = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=8)
    return _save(out, model, tok, ip, "PixtralProcessor", _template("[IMG]"), patch_size=8, spatial_merge_size=2)


def build_aya_vision(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    """Cohere2 text: layer 0 slides over an 8-token window, layer 1 is full (no positions there)."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    marks = ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>")
    tok = build_tokenizer(specials=marks, extra={"image_token": "<image>"})
    torch.manual_seed(seed)
    text = dict(model_type="cohere2", **_llama_text(tok, hidden, layers, head_dim=16, sliding_window=8,
                                                       layer_types=(["sliding_attention", "full_attention"] * layers)[:layers]))
    cfg = AyaVisionConfig(text_config=text, vision_config=_siglip(), downsample_factor=2,
                          image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), tie_word_embeddings=False)
    model = AyaVisionForConditionalGeneration(cfg).eval()
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=2)
    return _save(out, model, tok, ip, "AyaVisionProcessor", _template("<image>"), patch_size=8, img_size=32,
                 downsample_factor=2)


def build_internvl(out: Path, seed: int, layers: int = 2, hidden: int = 64) -> Path:
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    marks = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    tok = build_tokenizer(specials=marks, extra={"start_image_token": "<img>", "end_image_token": "</img>",
                                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    torch.manual_seed(seed)
    cfg = InternVLConfig(
        text_config=dict(model_type="qwen2", **_llama_text(tok, hidden, layers)),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=[32, 32], patch_size=[8, 8]),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4, downsample_ratio=0.5,
        tie_word_embeddings=False)
    model = InternVLForConditionalGeneration(cfg).eval()
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=2)
    return _save(out, model, tok, ip, "InternVLProcessor", _template("<IMG_CONTEXT>"), image_seq_length=4)
