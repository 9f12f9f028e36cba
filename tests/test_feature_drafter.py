"""Feature-level drafters (mmspec.drafters.feature): losslessness of every variant, train/inference
agreement, save/load, target checks, attention entropy and layer choice, compression maps, and a
smoke training run."""
import json

import numpy as np
import pytest
import torch

import mmspec.drafters.feature.drafter as fdm
from conftest import DEVICE, DTYPE
from mmspec import DecodeConfig, Decoder, InputError, generate, load_drafter, load_target
from mmspec import device_tree, entropy
from mmspec.drafters.feature.drafter import create_feature_drafter
from mmspec.drafters.feature.files import load_feature_drafter, save_feature_drafter
from mmspec.drafters.feature.net import VARIANTS, FeatConfig
from mmspec.drafters.feature.plan import QUERY, VIS, image_grid, plan_entries
from mmspec.model import CachedModel
from mmspec.tree import TreePool, _finish
from mmspec.world import default_calibration
from test_sampling import ENGINE_SAMPLING, engine_pair_pvalue
from tiny_models import image

STATIC = "static:[[0],[1],[2],[0,0],[0,1],[1,0],[0,0,0],[0,0,1],[0,1,0],[0,0,0,0]]"
TREES = ["chain:4", STATIC, "dynamic:16,5,3"]
PROMPT = "describe the image."
N_NEW = 32

_targets: dict = {}
_refs: dict = {}
_profiles: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: extra threads only contend (and can be 100x slower on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def target(tiny_dir, family):
    if family not in _targets:
        _targets[family] = load_target(str(tiny_dir / family), DEVICE, DTYPE)
    return _targets[family]


def reference(tiny_dir, family, seed=0):
    key = (family, seed)
    if key not in _refs:
        _refs[key] = generate(target(tiny_dir, family), None, image(seed), PROMPT, DecodeConfig(max_new_tokens=N_NEW))
    return _refs[key]


def drafter(tiny_dir, family, variant, seed=0, perturb=0.3, **over):
    """A random drafter with every path switched on (zero-initialised gates/fusions perturbed)."""
    tgt = target(tiny_dir, family)
    d = create_feature_drafter(variant, tgt, seed=seed, profile=_profiles.get(family),
                               examples=None if family in _profiles else default_calibration(), **over)
    _profiles[family] = d.meta["entropy_profile"]
    if perturb:
        g = torch.Generator().manual_seed(seed + 17)
        with torch.no_grad():
            for p in d.net.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p) * perturb)
    return d


# --- losslessness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_lossless_every_variant_llava(tiny_dir, variant):
    tgt = target(tiny_dir, "llava")
    ref = reference(tiny_dir, "llava")
    d = drafter(tiny_dir, "llava", variant)
    for tree in TREES:
        gen = generate(tgt, d, image(0), PROMPT, DecodeConfig(max_new_tokens=N_NEW, tree=tree))
        assert gen.token_ids == ref.token_ids, f"{variant} {tree}"
        assert gen.drafter_info["variant"] == variant
        steps = [s for s in gen.steps if s.kind == "draft" and len(s.tree)]
        assert steps and all(s.extras["drafter_forwards"] >= 1 for s in steps)
    # The fast path: the target's preallocated cache (read by AASD, saliency) and its padded hidden states.
    gen = generate(tgt, d, image(0), PROMPT, DecodeConfig(max_new_tokens=N_NEW, tree=TREES[-1], static_cache=True))
    assert gen.token_ids == ref.token_ids, f"{variant} {TREES[-1]} static cache"


# Every variant with the base's one layer, and AASD grown to two (only its first layer reads the target cache).
LAYERS = [(v, 1) for v in VARIANTS] + [("aasd", 2)]


@pytest.mark.parametrize("variant,layers", LAYERS)
def test_device_chain_lossless_every_variant(tiny_dir, variant, layers):
    """The fast path drafts chains and dynamic trees on the device (`_step_body`, `_tree_body`: feed
    the accepted entries, then draft; one CUDA graph each on a GPU), eagerly here: same output as
    vanilla, and the very drafts (tokens, tree, q, forwards) of the host-grown tree of the eager path."""
    for family in ("llava", "qwen2vl"):
        tgt, ref = target(tiny_dir, family), reference(tiny_dir, family)
        d = drafter(tiny_dir, family, variant, n_layers=layers)
        for tree in ("chain:4", "dynamic:16,5,3"):
            runs = {}
            for static in (False, True):
                gen = generate(tgt, d, image(0), PROMPT, DecodeConfig(max_new_tokens=N_NEW, tree=tree, static_cache=static))
                assert gen.token_ids == ref.token_ids, f"{variant} {family} {tree} static={static}"
                runs[static] = gen
            for a, b in zip(runs[False].steps, runs[True].steps):
                where = f"{variant} {family} {tree} step {a.index}"
                assert (a.tree.tokens, a.tree.parents, a.accepted) == (b.tree.tokens, b.tree.parents, b.accepted), where
                assert a.extras.get("drafter_forwards") == b.extras.get("drafter_forwards"), where
                assert np.allclose(a.tree.draft_probs, b.tree.draft_probs, atol=1e-4), where


def test_device_chain_handles_a_prompt_without_image(tiny_dir):
    tgt = target(tiny_dir, "llava")
    ref = generate(tgt, None, None, PROMPT, DecodeConfig(max_new_tokens=N_NEW))
    for variant in ("vispec", "dream", "aasd", "flash"):
        d = drafter(tiny_dir, "llava", variant)
        for static in (False, True):
            gen = generate(tgt, d, None, PROMPT, DecodeConfig(max_new_tokens=N_NEW, tree="chain:3", static_cache=static))
            assert gen.token_ids == ref.token_ids, f"{variant} static={static}"


@pytest.mark.parametrize("variant", ["eagle", "dream", "pool2", "topk", "vispec", "msd", "aasd", "flash"])
def test_greedy_lossless_qwen2vl(tiny_dir, variant):
    tgt = target(tiny_dir, "qwen2vl")
    ref = reference(tiny_dir, "qwen2vl")
    d = drafter(tiny_dir, "qwen2vl", variant)
    trees = TREES if variant == "eagle" else ["dynamic:16,5,3"]
    for tree in trees:
        gen = generate(tgt, d, image(0), PROMPT, DecodeConfig(max_new_tokens=N_NEW, tree=tree))
        assert gen.token_ids == ref.token_ids, f"{variant} {tree}"


def test_eos_and_max_tokens_with_feature_drafter(tiny_dir):
    tgt = target(tiny_dir, "llava")
    ref = reference(tiny_dir, "llava")
    d = drafter(tiny_dir, "llava", "eagle")
    for n in (1, 2, 5, 17):
        gen = generate(tgt, d, image(0), PROMPT, DecodeConfig(max_new_tokens=n, tree="dynamic:16,5,3"))
        assert gen.token_ids == ref.token_ids[:n]


# --- train / inference agreement --------------------------------------------------------------------


@pytest.mark.parametrize("variant,layers", LAYERS)
def test_training_forward_matches_inference(tiny_dir, variant, layers, monkeypatch):
    """The training-time-test forward (one teacher-forced pass, diagonal masks) gives the very
    distributions the engine-side drafter proposes while drafting along the true continuation."""
    from mmspec import train_feature as tf

    tgt = target(tiny_dir, "llava")
    img = image(3)
    ref = generate(tgt, None, img, PROMPT, DecodeConfig(max_new_tokens=24))
    inputs = tgt.family.prefill_inputs(tgt.processor, img, PROMPT)
    P = inputs["input_ids"].shape[1]
    full = inputs["input_ids"][0].tolist() + ref.token_ids
    d = drafter(tiny_dir, "llava", variant, unroll=3, n_layers=layers)
    depth = 3
    rec = []
    state = {}

    def forced_chain(expand, spec, sample, gen):  # draft the true continuation, recording q
        pool, q, parent = TreePool(), {}, -1
        n = P + len(state["committed"])
        for k in range(depth):
            row = expand(pool, [parent])[0]
            rec.append((n - 2, k, row))
            q[parent] = row
            if n + k >= len(full):
                break
            parent = pool.add(full[n + k], parent, float(row[full[n + k]]), 0.0)
        return _finish(pool, list(range(len(pool.tokens))), q)

    monkeypatch.setattr(device_tree, "grow_tree", forced_chain)  # off the fast path trees are grown there
    propose = d.propose

    def spy(committed, *a):
        state["committed"] = committed
        return propose(committed, *a)

    d.propose = spy
    # The eager path: the forced chain replaces grow_tree, which the device fast path (CUDA's default) never calls.
    gen = generate(tgt, d, img, PROMPT, DecodeConfig(max_new_tokens=24, tree="chain:3", static_cache=False))
    assert gen.token_ids == ref.token_ids
    assert all(s.accepted_len == len(s.tree) for s in gen.steps if s.kind == "draft")  # all drafts true

    batch = {"input_ids": torch.tensor([full]), "attention_mask": torch.ones(1, len(full), dtype=torch.long),
             "pixel_values": inputs["pixel_values"], "P": torch.tensor([P]), "len": torch.tensor([len(full)]),
             "with_image": torch.tensor([True]), "sizes": [img.size], "kinds": ["describe"]}
    net = d.net
    need = {"layers": net.target_layers, "cache": True, "saliency": net.cfg.compress == "topk"}
    sb = tf.target_pass(tgt, batch, need)
    cap = {}
    with torch.no_grad():
        tf.variant_loss(net, sb, 1.0, train=False, capture=cap)
    src = cap["plan"]["src"][0].tolist()
    assert len(rec) > 10
    for root, k, row in rec:
        e = src.index(root)
        if net.cfg.flash > 1:  # FLASH: depth k comes from head k of the root's forward
            r_idx, fh = cap[0]
            f = fh[0, int((r_idx[0] == e).nonzero()[0, 0]), k]
        else:
            r_idx, fh = cap[k]
            f = fh[0, int((r_idx[0] == e + k).nonzero()[0, 0]), 0]
        p = torch.log_softmax(net.logits(f).float(), -1)
        assert torch.allclose(p, row.log(), atol=1e-4), (variant, root, k)


@pytest.mark.parametrize("variant", ["eagle", "dream", "pool2", "topk", "vispec", "msd", "aasd", "flash"])
def test_training_forward_is_batch_invariant(tiny_dir, variant):
    """Padding, per-sample layouts (image or not, prompt lengths) and per-sample unroll rows: every
    sample gets the same outputs in a batch as alone."""
    from mmspec import train_feature as tf

    tgt = target(tiny_dir, "llava")
    ds = tf.WorldData(tgt, [11, 12, 13, 14], max_answer=20, text_frac=0.5)
    items = [ds[i] for i in range(4)]
    assert {it["with_image"] for it in items} == {True, False}
    d = drafter(tiny_dir, "llava", variant)
    net = d.net
    need = {"layers": net.target_layers, "cache": True, "saliency": net.cfg.compress == "topk"}
    coll = tf.Collate(0)

    def run(its):
        cap = {}
        with torch.no_grad():
            _, st = tf.variant_loss(net, tf.target_pass(tgt, coll(its), need), 1.0, train=False, capture=cap)
        return cap, st

    batched, _ = run(items)
    compared = 0
    for b, it in enumerate(items):
        alone, _ = run([it])
        n_real = int((alone["plan"]["kind"][0] >= 0).sum())
        for j in range(net.cfg.unroll):
            rows_a, fa = alone[j]
            rows_b, fb = batched[j]
            for qa, e in enumerate(rows_a[0].tolist()):
                if e >= n_real or e in rows_a[0].tolist()[:qa]:
                    continue
                hits = (rows_b[b] == e).nonzero()
                if len(hits) == 0:  # the batch unrolls from an earlier row; the alone run may start later
                    continue
                assert torch.allclose(fa[0, qa], fb[b, int(hits[0, 0])], atol=2e-5), (variant, b, j, e)
                compared += 1
    assert compared > 150


# --- sampling ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_peaky(tiny_dir, tmp_path_factory):
    """Smoke-train eagle and pool2 on the peaky tiny target (shared target forwards); the run must
    lower the held-out loss of both."""
    from mmspec import train_feature as tf

    out = tmp_path_factory.mktemp("feat")
    res = tf.main(["--target", str(tiny_dir / "llava-peaky"), "--variant", "eagle", "--variant", "pool2",
                   "--smoke", "--steps", "40", "--engine-eval", "0", "--out", str(out)])
    return out, res


@pytest.mark.slow
def test_smoke_training_lowers_the_loss(trained_peaky):
    out, res = trained_peaky
    for v in ("eagle", "pool2"):
        q = res[v]["quality"]
        assert q["heldout"]["loss"] < 0.8 * q["before_training"]["loss"], (v, q)
        assert q["heldout"]["acc0"] > q["before_training"]["acc0"]
        path = out / f"mmspec-feat-{v}"
        meta = json.loads((path / "mmspec_drafter.json").read_text())
        assert meta["variant"] == v and meta["training"]["steps"] == 40
        assert (path / "README.md").read_text().startswith(f"# mmspec-feat-{v}")
        assert (path / "model.safetensors").stat().st_size < 3 * 2**20


def overfit(d, tgt, img, prompt, steps=80, n_seq=16):
    """Fit a drafter to the target's own sampled continuations of one prompt (training internals:
    one shared target pass, the training-time-test loss), so that sampling tests see many acceptances."""
    from mmspec import train_feature as tf

    inputs = tgt.family.prefill_inputs(tgt.processor, img, prompt)
    ids = inputs["input_ids"][0].tolist()
    seqs = []
    for seed in range(n_seq):
        cfg = DecodeConfig(max_new_tokens=6, temperature=ENGINE_SAMPLING.temperature, top_p=ENGINE_SAMPLING.top_p, seed=seed)
        seqs.append(ids + generate(tgt, None, img, prompt, cfg).token_ids)
    T = max(len(x) for x in seqs)
    batch = {"input_ids": torch.tensor([x + [0] * (T - len(x)) for x in seqs]),
             "attention_mask": torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in seqs]),
             "pixel_values": inputs["pixel_values"].repeat(n_seq, 1, 1, 1), "P": torch.tensor([len(ids)] * n_seq),
             "len": torch.tensor([len(x) for x in seqs]), "with_image": torch.tensor([True] * n_seq),
             "sizes": [img.size] * n_seq, "kinds": ["describe"] * n_seq}
    net = d.net.train()
    need = {"layers": net.target_layers, "cache": True, "saliency": net.cfg.compress == "topk"}
    sb = tf.target_pass(tgt, batch, need)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = None
    for _ in range(steps):
        loss, _st = tf.variant_loss(net, sb, 1.0)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    assert float(loss.detach()) < 0.5 * first
    return d


@pytest.mark.slow
@pytest.mark.parametrize("variant,tree,static", [("eagle", "chain:3", None), ("pool2", "dynamic:8,3,3", None),
                                                 ("eagle", "chain:3", True), ("eagle", "dynamic:8,3,3", True)])
# static=True: the fast path, whose chains and trees draw their Gumbel noise on the device
def test_engine_sampling_matches_target_distribution(tiny_dir, variant, tree, static):
    tgt = load_target(str(tiny_dir / "llava-peaky"), DEVICE, DTYPE)
    prompt, img = "describe the image.", image(5)
    d = overfit(create_feature_drafter(variant, tgt, profile=[1.0, 1.0]), tgt, img, prompt)
    pvalue, accepted = engine_pair_pvalue(tgt, d, tree, n=600, prompt=prompt, img=img, static_cache=static)
    assert accepted > 0.5, "the drafter should get many drafts accepted, or the test proves little"
    assert pvalue > 1e-3


# --- save / load ---------------------------------------------------------------------------------


def test_save_load_round_trip_and_foreign_target(tiny_dir, tmp_path):
    tgt = target(tiny_dir, "llava")
    for variant in ("eagle", "dream", "vispec"):
        d = drafter(tiny_dir, "llava", variant)
        with torch.no_grad():  # weights are stored in fp16: round first so the copy is exact
            for p in d.net.parameters():
                p.copy_(p.half().float())
        path = save_feature_drafter(d, tmp_path / variant)
        loaded = load_drafter(str(path), tgt)
        assert isinstance(loaded, fdm.FeatureDrafter) and loaded.cfg == d.cfg
        a = generate(tgt, d, image(0), PROMPT, DecodeConfig(max_new_tokens=16, tree="dynamic:16,5,3"))
        b = generate(tgt, loaded, image(0), PROMPT, DecodeConfig(max_new_tokens=16, tree="dynamic:16,5,3"))
        for sa, sb in zip(a.steps, b.steps):
            assert sa.tree.tokens == sb.tree.tokens and sa.tree.parents == sb.tree.parents
            assert sa.tree.draft_probs == pytest.approx(sb.tree.draft_probs, abs=1e-6)
        info = loaded.info()
        assert info["entropy_profile"] == d.info()["entropy_profile"] and info["chosen_layers"]
        json.dumps(info)
    # Another target: a different family, and the same architecture with other weights.
    for other in ("qwen2vl", "llava-peaky"):
        with pytest.raises(InputError, match="trained for another target"):
            load_drafter(str(tmp_path / "eagle"), load_target(str(tiny_dir / other), DEVICE, DTYPE))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mmspec_drafter.json").write_text("{not json")
    with pytest.raises(InputError):
        load_feature_drafter(bad, tgt)


# --- entropy, layer choice, compression ----------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_recomputed_attention_equals_eager(tiny_dir, family):
    tgt = load_target(str(tiny_dir / family), DEVICE, DTYPE)
    inputs = tgt.family.prefill_inputs(tgt.processor, image(0), PROMPT)
    cm = CachedModel(tgt.model, tgt.family)
    _, hs = cm.prefill(inputs, hidden=True)
    tgt.model.set_attn_implementation("eager")
    out = tgt.model(**inputs, output_attentions=True)
    T = inputs["input_ids"].shape[1]
    pos = tgt.family.prefill_position_ids(tgt.model, inputs)
    pos = torch.arange(T)[None] if pos is None else pos
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None]
    for i, att in enumerate(out.attentions):
        p = entropy.attention_probs(tgt.model, i, hs[i], pos, cm.cache.layers[i].keys, allowed)
        assert torch.allclose(p, att.float(), atol=1e-5)


def test_entropy_profile_and_layer_rule(tiny_dir):
    d = drafter(tiny_dir, "llava", "dream", perturb=0)
    info = d.info()
    assert len(info["entropy_profile"]) == entropy.num_layers(target(tiny_dir, "llava").model) == 2
    assert all(0 < x <= 1.0 + 1e-6 for x in info["entropy_profile"])
    assert info["chosen_layers"] == [0, 1]  # 2 layers: first ceil(0.8) = 1 early layer, plus the last
    assert d.cfg.dream_layers == (0, 1) and d.target_layers == (0, 1, 2)
    prof = [0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.95, 0.1, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99]
    # First ceil(0.4 * 16) = 7 layers: lowest are 5 (0.2) and 3 (0.3); plus the last (15).
    assert entropy.choose_layers(prof) == ([3, 5, 15], 5)
    assert entropy.choose_layers(prof, k=1) == ([5, 15], 5)


def _counts(status):
    return {s: status.count(s) for s in set(status)}


def test_compression_maps_on_a_14x14_grid():
    base = dict(hidden=8, heads=2, kv_heads=2, head_dim=4, intermediate=8, target_layers_n=4, vocab=10)
    v0, n, P = 5, 196, 220
    assert image_grid(196, (224, 224)) == (14, 14)
    assert image_grid(12, (40, 30)) == (3, 4)

    def plan(**kw):
        return plan_entries(P, (v0, n), (14, 14), FeatConfig(**base, **kw))

    entries, vmap = plan()
    assert vmap is None and len(entries) == P
    entries, vmap = plan(compress="pool", pool=2)
    assert vmap["grid"] == [14, 14] and len(vmap["status"]) == 196 and _counts(vmap["status"]) == {"merged": 196}
    assert len(set(vmap["groups"])) == 49 and len(entries) == P - 196 + 49
    assert all(len(e.members) == 4 for e in entries if e.kind == VIS)
    entries, vmap = plan(compress="pool", pool=4)
    assert len(set(vmap["groups"])) == 16 and len(entries) == P - 196 + 16  # 4 x 4 groups (edges of 2)
    sal = [float(i % 7) for i in range(196)]
    entries, vmap = plan_entries(P, (v0, n), (14, 14), FeatConfig(**base, compress="topk", topk_keep=0.25), sal)
    assert _counts(vmap["status"]) == {"kept": 49, "dropped": 147} and len(entries) == P - 196 + 49
    kept = [i for i, s in enumerate(vmap["status"]) if s == "kept"]
    assert min(sal[i] for i in kept) >= max(sal[i] for i in range(196) if i not in kept)
    entries, vmap = plan(compress="queries", queries=3)
    assert _counts(vmap["status"]) == {"merged": 196} and len(entries) == P - 196 + 3
    q = [e for e in entries if e.kind == QUERY]
    assert [e.rope for e in q] == [v0 + n - 4, v0 + n - 3, v0 + n - 2]  # the span's last positions
    # Positions after the image keep their own RoPE position.
    assert entries[-1].rope == P - 1 and entries[-1].post


@pytest.mark.parametrize("variant,groups", [("pool2", 4), ("topk", None), ("vispec", None)])
def test_visual_map_in_engine_steps(tiny_dir, variant, groups):
    tgt = target(tiny_dir, "llava")
    d = drafter(tiny_dir, "llava", variant)
    gen = generate(tgt, d, image(0), PROMPT, DecodeConfig(max_new_tokens=8, tree="chain:2"))
    vmap = gen.steps[1].extras["visual_map"]
    ids = tgt.family.prefill_inputs(tgt.processor, image(0), PROMPT)["input_ids"][0].tolist()
    n_vis = sum(1 for t in ids if t == tgt.model.config.image_token_id)
    assert vmap["grid"][0] * vmap["grid"][1] == n_vis == len(vmap["status"])
    if groups:
        assert len(set(vmap["groups"])) == groups
    if variant == "topk":
        assert _counts(vmap["status"]) == {"kept": round(0.25 * n_vis), "dropped": n_vis - round(0.25 * n_vis)}
        assert len(vmap["saliency"]) == n_vis
    json.dumps(gen.to_dict())


def test_unknown_variant_and_bad_combination(tiny_dir):
    tgt = target(tiny_dir, "llava")
    with pytest.raises(InputError, match="unknown feature-drafter variant"):
        create_feature_drafter("nope", tgt, profile=[1.0, 1.0])
    with pytest.raises(InputError, match="aasd"):
        create_feature_drafter("aasd", tgt, profile=[1.0, 1.0], compress="pool")


def test_final_norm_is_fused_only_where_it_computes_the_same():
    """The target's final norm becomes one F.rms_norm call only when a probe shows it is weight *
    x / rms(x) (Llama); a Gemma-style (1 + weight) norm stays the module, and both give the
    module's own output."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from mmspec.drafters.feature.net import _as_rms_norm

    x = torch.randn(3, 16)
    for cls in (LlamaRMSNorm, GemmaRMSNorm):
        norm = cls(16, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(16))
        fused = _as_rms_norm(norm)
        assert (fused is norm) == (cls is GemmaRMSNorm), cls.__name__
        torch.testing.assert_close(fused(x), norm(x))
