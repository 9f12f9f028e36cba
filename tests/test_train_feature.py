"""mmspec.train_feature's cached, vectorised loss against the frozen per-sample reference
(tests/feat_loss_reference.py): same loss, statistics and gradients for every variant, so the
speed-up cannot change what a drafter learns; and the self-distillation pool holds the target's
own greedy answers."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import feat_loss_reference as ref
from mmspec import load_target
from mmspec import train_feature as tf
from mmspec.drafters.feature.drafter import create_feature_drafter
from mmspec.drafters.feature.net import VARIANTS
from mmspec.errors import InputError
from mmspec.train_feature_data import FeatureCache, item_loader, target_answers, with_answers
from mmspec.world import default_calibration

_cache: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend
    yield
    torch.set_num_threads(n)


def setup(tiny_dir):
    if not _cache:
        tgt = load_target(str(tiny_dir / "llava"), "cpu", "float32")
        items = _items(tgt)
        assert {it["with_image"] for it in items} == {True, False}  # mixed layouts in one batch
        _cache.update(tgt=tgt, items=items, batch=tf.Collate(0)(items), profile=None)
    return _cache


def drafter(c, variant):
    d = create_feature_drafter(variant, c["tgt"], seed=1, profile=c["profile"],
                               examples=default_calibration() if c["profile"] is None else None)
    c["profile"] = d.meta["entropy_profile"]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # switch every zero-initialised path on (gates, fusions)
        for p in d.net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return d.net.train()


def loss_and_grads(net, fn, sb, progress, train):
    net.zero_grad(set_to_none=True)
    loss, st = fn(net, sb, progress, train=train)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return float(loss.detach()), {k: float(v) for k, v in st.items()}, grads


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_loss_equals_per_sample_reference(tiny_dir, variant):
    c = setup(tiny_dir)
    net = drafter(c, variant)
    need = {"layers": net.target_layers, "cache": True, "saliency": net.cfg.compress == "topk"}
    old_sb = ref.target_pass(c["tgt"], c["batch"], need)
    new_sb = tf.target_pass(c["tgt"], c["batch"], need)
    # MSD weights differ by stage: check a text-only-stage step, a mixed-stage step and evaluation.
    for progress, train in ((0.3, True), (0.8, True), (1.0, False)):
        lo, so, go = loss_and_grads(net, ref.variant_loss, old_sb, progress, train)
        ln, sn, gn = loss_and_grads(net, tf.variant_loss, new_sb, progress, train)
        assert lo > 0 and np.isclose(ln, lo, rtol=1e-5, atol=1e-6), (variant, progress, ln, lo)
        # Training steps report only the loss; evaluation every statistic of the reference.
        assert set(sn) == ({"loss"} if train else set(so)), (variant, set(so) ^ set(sn))
        for k in sn:
            assert np.isclose(sn[k], so[k], rtol=1e-5, atol=1e-6), (variant, progress, k, sn[k], so[k])
        assert go.keys() == gn.keys() and go
        for n in go:
            assert torch.allclose(gn[n], go[n], rtol=1e-4, atol=1e-6), (variant, progress, n)


@pytest.mark.parametrize("variant", ["aasd", "flash"])
def test_top1_cross_entropy_term_equals_the_reference(tiny_dir, variant):
    """--w-top adds CE on the target's most likely token at every unroll step and future head: the
    same loss and gradients as the per-sample reference, and a different loss from w_top = 0."""
    c = setup(tiny_dir)
    net = drafter(c, variant)
    need = {"layers": net.target_layers, "cache": True, "saliency": False}
    old_sb, new_sb = ref.target_pass(c["tgt"], c["batch"], need), tf.target_pass(c["tgt"], c["batch"], need)
    plain, _, _ = loss_and_grads(net, tf.variant_loss, new_sb, 1.0, True)
    net.cfg = dataclasses.replace(net.cfg, w_top=0.7)
    lo, _, go = loss_and_grads(net, ref.variant_loss, old_sb, 1.0, True)
    ln, _, gn = loss_and_grads(net, tf.variant_loss, new_sb, 1.0, True)
    assert np.isclose(ln, lo, rtol=1e-5) and ln > plain + 1e-3, (ln, lo, plain)
    for n in go:
        assert torch.allclose(gn[n], go[n], rtol=1e-4, atol=1e-6), n


def test_cache_rows_do_not_depend_on_the_batch(tiny_dir):
    """A batch gathered from a bigger cache (other rows, longer padding) gives the loss of the
    same samples cached alone."""
    c = setup(tiny_dir)
    net = drafter(c, "dream")
    need = {"layers": net.target_layers, "cache": True, "saliency": False}
    big = FeatureCache(c["tgt"], need)
    big.add(c["batch"])
    ds = tf.WorldData(c["tgt"], [40, 41], max_answer=60, text_frac=0.5)
    big.add(tf.Collate(0)([ds[0], ds[1]]))  # longer sequences: the cache pads to them
    big.finish()
    pick = np.array([3, 0, 4])
    alone = FeatureCache(c["tgt"], need)
    alone.add(tf.Collate(0)([c["items"][i] for i in pick]))
    alone.finish()
    with torch.no_grad():
        a, sa = tf.variant_loss(net, big.view(pick), 1.0, train=False)
        b, sb = tf.variant_loss(net, alone.view(np.arange(3)), 1.0, train=False)
    assert torch.allclose(a, b, rtol=1e-5), (float(a), float(b))
    for k in sb:
        assert torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6), k
    assert big.T > alone.T


def _items(tgt):
    ds = tf.WorldData(tgt, [21, 22, 23, 24, 25], max_answer=20, text_frac=0.5)
    return [ds[i] for i in range(5)]


def test_pool_holds_the_targets_greedy_answers(tiny_dir):
    from mmspec import DecodeConfig, generate
    from mmspec.world import sample_example

    c = setup(tiny_dir)
    tgt = c["tgt"]
    items = next(iter(item_loader(tgt, [31, 32, 33], 3, 0, 12)))
    answers = target_answers(tgt, items, 12, sample=False)
    for it, ans in zip(items, answers):
        img, qa, _ = sample_example(it["seed"])
        want = generate(tgt, None, img if it["with_image"] else None, qa.prompt, DecodeConfig(max_new_tokens=12)).token_ids
        assert ans == want, (it["seed"], ans, want)
    rows = with_answers(items, answers)
    assert all(r["ids"][: r["P"]] == it["ids"][: it["P"]] for r, it in zip(rows, items))


def test_tracker_stops_on_patience_and_keeps_the_best_weights():
    net = torch.nn.Linear(2, 2)
    net.cfg = type("C", (), {"unroll": 1})()
    tr = tf.Tracker({"v": net}, patience=2)
    chains = [0.5, 0.7, 0.69, 0.7]  # best at the second evaluation; equal is not better
    stops = []
    for k, ch in enumerate(chains):
        with torch.no_grad():
            net.weight.fill_(float(k))
        stops.append(tr.update(100 * (k + 1), {"v": {"acc0": ch, "chain_accept": ch}}))
    assert stops == [[], [], [], ["v"]]
    tr.restore()
    assert torch.all(net.weight == 1.0) and tr.best["v"][0] == 200
    assert tr.rows("v") == [[100, 0.5, 0.5], [200, 0.7, 0.7], [300, 0.69, 0.69], [400, 0.7, 0.7]]


def test_generation_chunks_keep_descriptions_apart_and_sample_a_share():
    items = [{"kind": "describe" if i % 3 == 0 else "count", "i": i} for i in range(20)]
    loader = [items[i: i + 7] for i in range(0, 20, 7)]  # workers deliver small batches
    chunks = list(tf.chunked(loader, 4))
    assert sorted(it["i"] for c in chunks for it in c) == list(range(20))
    assert all(len({it["kind"] for it in c}) == 1 and len(c) <= 4 for c in chunks)
    assert sum(len(c) < 4 for c in chunks) <= 2  # only the two remainders are short
    for frac, sizes in ((0.5, [1024, 1024, 1024, 512]), (0.25, [1024, 3]), (0.3, [7] * 13), (0.0, [5, 5]), (1.0, [4, 1])):
        answered = sampled = 0
        for n in sizes:
            k = tf.sampled_count(answered, sampled, n, frac)
            assert 0 <= k <= n
            answered, sampled = answered + n, sampled + k
            assert abs(sampled - frac * answered) <= 0.5  # the share holds after every chunk, not just at the end


@pytest.mark.slow
def test_init_continues_from_a_saved_drafter(tmp_path):
    """--init starts from the saved weights: the second run's held-out accuracy before training is
    the first run's after it (the same held-out prompts), and its record names where it started."""
    args = ["--variant", "eagle", "--smoke", "--device", "cpu", "--engine-eval", "0"]
    first = tf.main(args + ["--out", str(tmp_path / "a")])["eagle"]
    # A loss weight is not part of how a drafter is built: a run may continue with another.
    second = tf.main(args + ["--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"), "--w-top", "0.5"])["eagle"]
    assert second["quality"]["before_training"]["acc0"] == first["quality"]["heldout"]["acc0"]
    assert second["initialised_from"]["trained_steps"] == first["trained_steps"]
    card = (tmp_path / "b" / "mmspec-feat-eagle" / "README.md").read_text()
    assert f"Started from the weights of an earlier run: {first['trained_steps']} steps" in card
    assert "0.5 x CE(the target's top-1 token)" in card
    shutil.copytree(tmp_path / "a" / "mmspec-feat-eagle", tmp_path / "other" / "mmspec-feat-aasd")
    with pytest.raises(InputError, match="differently built"):
        tf.main(["--variant", "aasd", "--smoke", "--device", "cpu", "--engine-eval", "0",
                 "--out", str(tmp_path / "c"), "--init", str(tmp_path / "other")])


@pytest.mark.slow
def test_init_grows_a_drafter_by_a_layer(tmp_path):
    """--init with --layers 2 from a saved 1-layer drafter: the new layer starts as the identity, so
    before training the grown drafter agrees with the target exactly as the saved one did after its
    run; a drafter is never shrunk."""
    args = ["--variant", "aasd", "--smoke", "--device", "cpu", "--engine-eval", "0"]
    first = tf.main(args + ["--out", str(tmp_path / "a")])["aasd"]
    grown = tf.main(args + ["--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"), "--layers", "2"])["aasd"]
    assert grown["quality"]["before_training"]["acc0"] == first["quality"]["heldout"]["acc0"]
    meta = json.loads((tmp_path / "b" / "mmspec-feat-aasd" / "mmspec_drafter.json").read_text())
    assert meta["config"]["n_layers"] == 2 and grown["initialised_from"]["layers"] == 1
    assert "1 layer(s)" in (tmp_path / "b" / "mmspec-feat-aasd" / "README.md").read_text()
    with pytest.raises(InputError, match="n_layers"):
        tf.main(args + ["--out", str(tmp_path / "c"), "--init", str(tmp_path / "b")])
