"""The family matrix: every supported VLM family decodes exactly, or is refused at load with one line.

For each family, a tiny random model built from its transformers config (tests/tiny_models.py):
- engine vanilla == transformers' own greedy `generate` over 48 tokens on two prompts;
- speculative == vanilla for n-gram, `random` (every step rolled back), the target as its own
  drafter and a 1-layer draft of the family, with chain:4 and a dynamic tree, eager and on the
  static fast path (preallocated cache; on the CPU without graphs);
- T=1 sampling runs on both paths.
The matrix is marked slow (minutes on a 2-core CPU). Refusals are fast: a model type without an
adapter and a model whose cache cannot be rolled back (Qwen3.5's linear attention) exit 2 with one
line naming the cause; a local directory's loading error never blames the network.
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
    "glm4v": tm.build_glm4v,
    "gemma3": tm.build_gemma3,
    "paligemma": tm.build_paligemma,
    "mistral3": tm.build_mistral3,
    "aya_vision": tm.build_aya_vision,
    "internvl": tm.build_internvl,
}
FAMILIES = list(BUILDERS)

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
        out = tgt.model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tgt.tokenizer.pad_token_id)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_vanilla_equals_transformers_generate(fam_root, family):
    _, tgt = family_model(fam_root, family)
    for prompt, seed in PROMPTS:
        van = generate(tgt, None, image(seed), prompt, DecodeConfig(max_new_tokens=N_HF, static_cache=False))
        hf = hf_greedy(tgt, prompt, seed, N_HF)  # both stop at EOS (a random model may emit it early)
        assert van.token_ids == hf, f"{family} {prompt!r}"
        assert len(hf) >= 24, "a fixture that stops this early tests too little"
        fast = generate(tgt, None, image(seed), prompt, DecodeConfig(max_new_tokens=N_HF, static_cache=True))
        assert fast.token_ids == hf, f"{family} {prompt!r} (static cache)"


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_runs(fam_root, family):
    _, tgt = family_model(fam_root, family)
    draft_dir, _ = family_model(fam_root, family, draft=True)
    drafter = load_drafter(str(draft_dir), tgt)
    for static in (False, True):
        cfg = DecodeConfig(max_new_tokens=12, temperature=1.0, seed=3, tree="dynamic:12,4,3", static_cache=static)
        gen = generate(tgt, drafter, image(0), PROMPTS[0][0], cfg)
        assert 1 <= len(gen.token_ids) <= 12


def _cli(capsys, target: str, *extra: str) -> tuple[int, str]:
    from mmspec.cli import main

    rc = main(["generate", "--target", target, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu", *extra])
    return rc, capsys.readouterr().err


def _config_only(out, config):
    config.save_pretrained(out)  # refusal happens before any weights or processor are read
    return str(out)


def test_linear_attention_is_refused(tmp_path, capsys):
    from transformers import Qwen3_5Config

    cfg = Qwen3_5Config(text_config=dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                                         hidden_size=32, num_attention_heads=2, num_key_value_heads=1))
    target = _config_only(tmp_path / "q35", cfg)
    for extra in ((), ("--family", "qwen2_vl")):  # forcing an adapter does not make the rollback exact
        rc, err = _cli(capsys, target, *extra)
        assert rc == 2 and err.count("\n") == 1
        assert "linear_attention" in err and "rolled back" in err and "Traceback" not in err


def test_unknown_model_type_is_refused_and_family_forces_one(tmp_path, capsys):
    from transformers import Idefics2Config

    rc, err = _cli(capsys, _config_only(tmp_path / "idefics2", Idefics2Config()))
    assert rc == 2 and err.count("\n") == 1
    assert "'idefics2' has no mmspec family adapter" in err and "--family" in err
    rc, err = _cli(capsys, str(tmp_path / "idefics2"), "--family", "nonesuch")
    assert rc == 2 and "unknown family 'nonesuch'" in err


def test_family_flag_picks_the_adapter(tiny_dir):
    assert load_target(str(tiny_dir / "llava"), DEVICE, DTYPE).family.name == "llava"
    assert load_target(str(tiny_dir / "llava"), DEVICE, DTYPE, family="gemma3").family.name == "gemma3"


def test_a_local_directory_error_names_its_cause(tiny_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir / "llava", broken)
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    rc, err = _cli(capsys, str(broken))
    assert rc == 2 and err.count("\n") == 1
    assert "offline" not in err and str(broken) in err


def test_processors_load_without_torchvision():
    """The documented install has no torchvision; the family processors must not import it."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    from mmspec.families import _processor_class

    for name in ("PixtralProcessor", "LlavaOnevisionProcessor", "SmolVLMProcessor", "InternVLProcessor",
                 "Qwen3VLProcessor", "Glm4vProcessor"):
        assert type(_processor_class(name)).__name__ != "DummyObject", name


def test_entropy_refuses_attention_it_cannot_rebuild():
    """Gemma3 (query norm, sliding windows) and Qwen3-VL (query norm) are refused by name; LLaVA's
    Llama and Qwen2-VL's decoder are rebuilt (checked against output_attentions in test_feature_drafter)."""
    from transformers import Gemma3Config, LlavaConfig, Qwen2VLConfig, Qwen3VLConfig

    from mmspec.families import attention_recompute_problem

    assert attention_recompute_problem(LlavaConfig()) is None
    assert attention_recompute_problem(Qwen2VLConfig()) is None
    assert "gemma3_text" in attention_recompute_problem(Gemma3Config())
    assert "qwen3_vl_text" in attention_recompute_problem(Qwen3VLConfig())
