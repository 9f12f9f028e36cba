"""Training EAGLE-3 format heads by self-distillation (mmspec.train_eagle3).

The batched training pass equals the single-sequence one (which test_eagle3_head checks against
drafting) on right-padded rows of different lengths and positions; the smoke training run on a tiny
target lowers its loss and writes a head that loads as a lossless drafter and exports to the format.
"""
import json

import pytest
import torch

from conftest import DEVICE, DTYPE
from mmspec import DecodeConfig, generate, load_drafter, load_target
from mmspec.drafters.eagle3_head import create_head, export_eagle3, unroll, unroll_batch
from mmspec.world import held_out_seeds, sample_example
from test_eagle3_head import LAYERS, _one_thread, target, tdir  # noqa: F401 - fixtures: one thread, tiny 4-layer targets
from tiny_models import build_llava, build_qwen2_vl


def _noisy_head(tgt, seed):
    """A format head with a reduced vocabulary and every weight perturbed (a fresh head's norms are all one)."""
    V = tgt.model.config.text_config.vocab_size
    d = create_head(tgt, aux=(1, 2, 3), draft_ids=list(range(0, V, 3)), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return d.head


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_batched_unroll_equals_single_sequence(tdir, family):
    head = _noisy_head(target(tdir, family), seed=3)
    B, n, steps, V = 3, 11, 3, head.cfg.vocab
    lens = [11, 6, 8]
    g = torch.Generator().manual_seed(0)
    aux = torch.randn(B, n, 3 * head.cfg.target_hidden, generator=g)
    tokens = torch.randint(0, V, (B, n + steps), generator=g)
    if head.cfg.mrope_section is None:  # each row its own offset: a batch-wide position would fail
        pos = torch.arange(n)[None] + torch.tensor([0, 5, 17])[:, None]
    else:  # independent t/h/w axes per row
        pos = torch.randint(0, 40, (B, 3, n), generator=g)
    with torch.no_grad():
        batched = unroll_batch(head, aux, tokens, pos, steps)
        for b, m in enumerate(lens):
            single = unroll(head, aux[b, :m], tokens[b, : m + steps], pos[b, ..., :m], steps)
            for j in range(steps):
                torch.testing.assert_close(batched[j][b, :m], single[j], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_smoke_training_gives_a_lossless_exportable_head(tdir, tmp_path, family):
    """The --smoke run on a peaky tiny target (concentrated distributions: something to learn; Qwen2-VL:
    M-RoPE positions) with a reduced draft vocabulary (a non-zero d2t): training lowers the loss and
    raises held-out agreement, and the saved directory drafts losslessly, is accepted, and exports."""
    from mmspec.train_eagle3 import main

    build = build_llava if family == "llava" else build_qwen2_vl
    tpath = tdir / f"{family}-peaky"
    if not tpath.exists():
        build(tpath, seed=22, layers=LAYERS, peaky=6.0)
    out = tmp_path / "head"
    info = main(["--target", str(tpath), "--out", str(out), "--smoke", "--device", DEVICE, "--aux", "1,2,3", "--draft-vocab", "300"])
    meta = json.loads((out / "mmspec_drafter.json").read_text())
    curve = meta["curve"]
    assert meta["trained"] is True and meta["steps"] == info["steps"] > 0 and meta["agreement"] == info["agreement"]
    assert curve[-1]["train_loss"] < 0.5 * curve[0]["train_loss"]
    assert info["kl"] < info["before"]["kl"] and info["agreement"][0] > info["before"]["agree"][0] + 0.2
    assert info["engine"]["lossless_check"] is True, info["engine"]  # the trainer's own check through the engine
    assert "## Measured quality" in (out / "README.md").read_text()

    tgt = load_target(str(tpath), DEVICE, DTYPE)
    exported = export_eagle3(out, tmp_path / "exported")
    raw = json.loads((exported / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLMEagle3"] and raw["draft_vocab_size"] == 300
    assert raw["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    prompts = [sample_example(seed)[:2] for seed in held_out_seeds(2, 800_000)]  # the world it was trained on
    refs = [generate(tgt, None, img, qa.prompt, DecodeConfig(max_new_tokens=24)).token_ids for img, qa in prompts]
    taus = []
    for path in (out, exported):
        d = load_drafter(str(path), tgt)
        assert d.head.cfg.draft_vocab == 300 and bool(d.head.d2t.any())
        for tree in ("chain:3", "dynamic:12,3,3"):
            for (img, qa), ref in zip(prompts, refs):
                g = generate(tgt, d, img, qa.prompt, DecodeConfig(max_new_tokens=24, tree=tree))
                assert g.token_ids == ref
                taus.append(g.stats.tau)
    assert max(taus) > 1.0  # drafts are accepted (a random head's never are): the check covered accepted paths


def test_aux_layers_default_and_refusal(tdir):
    from mmspec import InputError
    from mmspec.train_eagle3 import aux_layers

    tgt = target(tdir, "llava")
    assert aux_layers(tgt, "3,1,2") == (1, 2, 3)
    with pytest.raises(InputError, match="--aux"):  # the default (2, L//2, L-3) = (2, 2, 1) repeats a layer at L = 4
        aux_layers(tgt, None)
    with pytest.raises(InputError, match="0..3"):
        aux_layers(tgt, "1,2,4")
