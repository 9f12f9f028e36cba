"""The family matrix: every supported VLM family decodes exactly, or is refused at load with one line.

For each family, a tiny random model built from its transformers config (tests/tiny_models.py):
- engine vanilla == transformers' own greedy `generate` over 48 tokens on two prompts;
- speculative == vanilla for n-gram, `random` (every step rolled back), the target as its own
  drafter and a 1-layer draft of the family, with chain:4 and a dynamic tree, eager and on the
  static fast path (preallocated cache; on the CPU without graphs);
- T=1 sampling runs on both paths.
"""
import pytest
import torch

import tiny_models as tm
from conftest import DEVICE, DTYPE
from mmspec import DecodeConfig, generate, load_drafter, load_target
from tiny_models import image

N_HF = 48  # tokens compared with transformers' generate
N_SPEC = 20  # tokens compared between speculative and vanilla decoding (per drafter x tree x path)
PROMPTS = [("describe the image.", 0), ("how many shapes can you see?", 7)]
BUILDERS = {
    "llava": lambda out, seed, layers: tm.build_llava(out, seed, layers=layers),
    "llava_next": tm.build_llava_next,
    "qwen2_vl": lambda out, seed, layers: tm.build_qwen2_vl(out, seed, layers=layers),
    "qwen2_5_vl": tm.build_qwen2_5_vl,
    "idefics3": tm.build_idefics3,
    "smolvlm": tm.build_smolvlm,
    "llava_onevision": tm.build_llava_onevision,
    "qwen3_vl": tm.build_qwen3_vl,
}
FAMILIES = list(BUILDERS)

pytestmark = pytest.mark.slow

_built: dict = {}


@pytest.fixture(scope="module")
def fam_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def family_model(root, family: str, draft: bool = False):
    """(directory, loaded target) of the family's tiny model; the draft has 1 layer and another seed."""
    key = (family, draft)
    if key not in _built:
        out = root / (family + ("-draft" if draft else ""))
        BUILDERS[family](out, 11 if draft else 10, 1 if draft else 2)
        _built[key] = (out, None if draft else load_target(str(out), DEVICE, DTYPE))
    return _built[key]


def hf_greedy(tgt, prompt: str, seed: int, n: int) -> list[int]:
    inputs = tgt.family.prefill_inputs(tgt.processor, image(seed), prompt)
    inputs = {k: v.to(tgt.device) for k, v in inputs.items()}
    with torch.no_grad():
        out = tgt.model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                                 pad_token_id=tgt.tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_vanilla_equals_transformers_generate(fam_root, family):
    _, tgt = family_model(fam_root, family)
    for prompt, seed in PROMPTS:
        van = generate(tgt, None, image(seed), prompt, DecodeConfig(max_new_tokens=N_HF, static_cache=False))
        hf = hf_greedy(tgt, prompt, seed, N_HF)
        assert len(van.token_ids) == N_HF
        assert van.token_ids == hf, f"{family} {prompt!r}"
        fast = generate(tgt, None, image(seed), prompt, DecodeConfig(max_new_tokens=N_HF, static_cache=True))
        assert fast.token_ids == hf, f"{family} {prompt!r} (static cache)"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_speculative_equals_vanilla(fam_root, family, static):
    target_dir, tgt = family_model(fam_root, family)
    draft_dir, _ = family_model(fam_root, family, draft=True)
    refs = {p: generate(tgt, None, image(s), p, DecodeConfig(max_new_tokens=N_SPEC, static_cache=False)).token_ids
            for p, s in PROMPTS}
    for name in ["ngram", "random", str(target_dir), str(draft_dir)]:
        drafter = load_drafter(name, tgt)
        for tree in ["chain:4", "dynamic:12,4,3"]:
            for prompt, seed in PROMPTS:
                cfg = DecodeConfig(max_new_tokens=N_SPEC, tree=tree, static_cache=static)
                gen = generate(tgt, drafter, image(seed), prompt, cfg)
                assert gen.token_ids == refs[prompt], f"{family} {name} {tree} {prompt!r} static={static}"
    # The target drafting for itself must accept every draft: a wrong mask or position would not.
    self_gen = generate(tgt, load_drafter(str(target_dir), tgt), image(0), PROMPTS[0][0],
                        DecodeConfig(max_new_tokens=N_SPEC, tree="chain:4", static_cache=static))
    assert all(s.accepted_len == len(s.tree.tokens) for s in self_gen.steps[1:-1]), family


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_runs(fam_root, family):
    _, tgt = family_model(fam_root, family)
    draft_dir, _ = family_model(fam_root, family, draft=True)
    drafter = load_drafter(str(draft_dir), tgt)
    for static in (False, True):
        cfg = DecodeConfig(max_new_tokens=12, temperature=1.0, seed=3, tree="dynamic:12,4,3", static_cache=static)
        gen = generate(tgt, drafter, image(0), PROMPTS[0][0], cfg)
        assert 1 <= len(gen.token_ids) <= 12
