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


def build_tokenizer(vocab_size: int = 400, extra: dict | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
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
