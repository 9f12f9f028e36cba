"""Greedy losslessness: speculative output == vanilla output, token for token, for every drafter x
tree shape x model family, on tiny random models; plus EOS, max_new_tokens and cache invariants."""
import pytest
import torch

from conftest import DEVICE, DTYPE
from mmspec import DecodeConfig, Decoder, generate, load_drafter, load_target
from tiny_models import image

STATIC = "static:[[0],[1],[2],[0,0],[0,1],[1,0],[0,0,0],[0,0,1],[0,1,0],[0,0,0,0]]"
TREES = ["chain:4", "chain:1", STATIC, "dynamic:16,5,3"]
PROMPTS = [("describe the image.", 0), ("how many shapes can you see?", 7)]
N_NEW = 64

_targets: dict = {}
_refs: dict = {}


def target(tiny_dir, family):
    if family not in _targets:
        _targets[family] = load_target(str(tiny_dir / family), DEVICE, DTYPE)
    return _targets[family]


def reference(tiny_dir, family, prompt, seed):
    key = (family, prompt, seed)
    if key not in _refs:
        _refs[key] = generate(target(tiny_dir, family), None, image(seed), prompt, DecodeConfig(max_new_tokens=N_NEW))
    return _refs[key]


def drafter_names(tiny_dir, family):
    own = str(tiny_dir / family)
    names = ["ngram", "random", own, str(tiny_dir / "text-draft")]
    if family == "llava":
        names.append(str(tiny_dir / "llava-draft"))
    return names


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
@pytest.mark.parametrize("tree", TREES)
def test_greedy_speculative_equals_vanilla(tiny_dir, family, tree):
    tgt = target(tiny_dir, family)
    for name in drafter_names(tiny_dir, family):
        drafter = load_drafter(name, tgt)
        for prompt, seed in PROMPTS:
            ref = reference(tiny_dir, family, prompt, seed)
            assert len(ref.token_ids) == N_NEW
            gen = generate(tgt, drafter, image(seed), prompt, DecodeConfig(max_new_tokens=N_NEW, tree=tree))
            assert gen.token_ids == ref.token_ids, f"{family} {name} {tree} {prompt!r}"
            assert gen.text == ref.text


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
@pytest.mark.parametrize("tree", ["chain:4", STATIC, "dynamic:16,5,3"])
def test_static_cache_fast_path_is_lossless(tiny_dir, family, tree):
    """The preallocated cache (CUDA graphs on top when on a GPU), for the target and a draft model,
    against vanilla decoding through the growing cache; also vanilla on the fast path."""
    tgt = target(tiny_dir, family)
    fast = dict(max_new_tokens=N_NEW, tree=tree, static_cache=True)
    for name in ["ngram", str(tiny_dir / "text-draft")] + ([str(tiny_dir / "llava-draft")] if family == "llava" else []):
        drafter = load_drafter(name, tgt)
        for prompt, seed in PROMPTS:
            ref = reference(tiny_dir, family, prompt, seed)
            gen = generate(tgt, drafter, image(seed), prompt, DecodeConfig(**fast))
            assert gen.config["static_cache"] is True
            assert gen.token_ids == ref.token_ids, f"{family} {name} {tree} {prompt!r} (static cache)"
    for prompt, seed in PROMPTS:  # twice: the second run reuses the leased buffers (and graphs)
        for _ in range(2):
            van = generate(tgt, None, image(seed), prompt, DecodeConfig(**fast))
            assert van.token_ids == reference(tiny_dir, family, prompt, seed).token_ids


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_device_drafted_trees_equal_host_grown_ones(tiny_dir, family):
    """On the fast path a draft model grows dynamic trees on the device (`CachedModel.draft_tree`):
    the same trees (tokens, shape, q) as tree.grow_tree on the growing cache, the same output; the
    target as its own drafter makes long accepted paths, a text drafter short ones."""
    tgt = target(tiny_dir, family)
    for name in (str(tiny_dir / family), str(tiny_dir / "text-draft")):
        drafter = load_drafter(name, tgt)
        for tree in ("dynamic:16,5,3", "dynamic:6,3,4"):
            ref = reference(tiny_dir, family, *PROMPTS[0])
            runs = [generate(tgt, drafter, image(PROMPTS[0][1]), PROMPTS[0][0],
                             DecodeConfig(max_new_tokens=N_NEW, tree=tree, static_cache=static)) for static in (False, True)]
            assert runs[0].token_ids == runs[1].token_ids == ref.token_ids, f"{family} {name} {tree}"
            for a, b in zip(*(r.steps for r in runs)):
                assert (a.tree.tokens, a.tree.parents, a.accepted) == (b.tree.tokens, b.tree.parents, b.accepted), \
                    f"{family} {name} {tree} step {a.index}"
                assert a.tree.draft_probs == pytest.approx(b.tree.draft_probs, abs=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_perfect_drafter_accepts_everything(tiny_dir, family):
    tgt = target(tiny_dir, family)
    drafter = load_drafter(str(tiny_dir / family), tgt)
    gen = generate(tgt, drafter, image(0), PROMPTS[0][0], DecodeConfig(max_new_tokens=N_NEW, tree="chain:4"))
    decode = [s for s in gen.steps if s.kind == "draft"]
    # Every full step accepts all 4 drafts and adds the bonus; only the last may be cut by max_new_tokens.
    assert all(s.accepted_len == 4 and s.next_kind == "bonus" for s in decode[:-1])
    assert gen.stats.tau == pytest.approx((N_NEW - 1) / len(decode))
    full = [len(s.new_tokens) for s in decode[:-1]]
    assert set(full) == {5}


def test_random_drafter_is_rejected_but_lossless(tiny_dir):
    tgt = target(tiny_dir, "llava")
    gen = generate(tgt, load_drafter("random", tgt), image(0), PROMPTS[0][0], DecodeConfig(max_new_tokens=N_NEW, tree="dynamic:16,5,3"))
    assert gen.stats.tau < 1.2
    assert all(s.next_kind in ("correction", "bonus") for s in gen.steps if s.kind == "draft" and len(s.tree))


@pytest.mark.parametrize("tree", ["chain:4", "dynamic:16,5,3"])
def test_eos_inside_accepted_run_stops_there(tiny_dir, tree):
    tgt = target(tiny_dir, "llava")
    ref = reference(tiny_dir, "llava", *PROMPTS[0])
    # Declare a token from the middle of the vanilla answer to be EOS: with the perfect drafter it is
    # accepted inside a draft run, and generation must stop right after it.
    eos_tok = ref.token_ids[21]
    first = ref.token_ids.index(eos_tok)
    old = tgt.model.generation_config.eos_token_id
    tgt.model.generation_config.eos_token_id = eos_tok
    try:
        drafter = load_drafter(str(tiny_dir / "llava"), tgt)
        gen = generate(tgt, drafter, image(0), PROMPTS[0][0], DecodeConfig(max_new_tokens=N_NEW, tree=tree))
        van = generate(tgt, None, image(0), PROMPTS[0][0], DecodeConfig(max_new_tokens=N_NEW))
    finally:
        tgt.model.generation_config.eos_token_id = old
    assert gen.token_ids == ref.token_ids[: first + 1] == van.token_ids
    last = gen.steps[-1]
    assert last.new_tokens[-1] == eos_tok
    if first > 0:
        # the EOS was an accepted draft token, not the step's own next token
        assert eos_tok in [last.tree.tokens[n] for n in last.accepted] or last.next_token == eos_tok


@pytest.mark.parametrize("max_new", [1, 2, 3, 6, 11])
@pytest.mark.parametrize("tree", ["chain:4", "dynamic:16,5,3", STATIC])
def test_max_new_tokens_is_never_exceeded(tiny_dir, max_new, tree):
    tgt = target(tiny_dir, "llava")
    drafter = load_drafter(str(tiny_dir / "llava"), tgt)
    gen = generate(tgt, drafter, image(0), PROMPTS[0][0], DecodeConfig(max_new_tokens=max_new, tree=tree))
    assert len(gen.token_ids) == max_new
    assert gen.token_ids == reference(tiny_dir, "llava", *PROMPTS[0]).token_ids[:max_new]


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
@pytest.mark.parametrize("drafter_kind", ["self", "text", "ngram"])
def test_cache_holds_exactly_the_committed_tokens(tiny_dir, family, drafter_kind):
    tgt = target(tiny_dir, family)
    name = {"self": str(tiny_dir / family), "text": str(tiny_dir / "text-draft"), "ngram": "ngram"}[drafter_kind]
    drafter = load_drafter(name, tgt)
    dec = Decoder(tgt, drafter, image(3), PROMPTS[1][0], DecodeConfig(max_new_tokens=40, tree="dynamic:12,4,3"))
    n = 0
    prompt_len = None
    for step in dec:
        n += len(step.new_tokens)
        cache = dec.target_cache
        if prompt_len is None:
            prompt_len = cache.length
        # every committed token is in the cache except the newest, which the next step feeds as root
        assert cache.length == cache.committed == prompt_len + n - 1
        if step.kind == "draft" and hasattr(drafter, "cm"):
            assert drafter.cm.length == drafter.cm.committed  # tree entries were rolled back
    assert n == len(dec.result.token_ids)


def test_steps_record_what_happened(tiny_dir):
    tgt = target(tiny_dir, "llava")
    gen = generate(tgt, load_drafter(str(tiny_dir / "llava-draft"), tgt), image(0), PROMPTS[0][0],
                   DecodeConfig(max_new_tokens=30, tree="dynamic:10,4,3"))
    assert gen.steps[0].kind == "prefill"
    for s in gen.steps[1:]:
        t = s.tree
        assert len(t.tokens) == len(t.parents) == len(t.depths) == len(t.draft_probs) == len(s.node_texts)
        assert len(s.target_tokens) == len(s.target_probs) == len(t.tokens)
        assert all(p < i for i, p in enumerate(t.parents))
        assert all(0.0 <= q <= 1.0 for q in t.draft_probs)
        # the accepted nodes form a root-to-node path whose tokens equal the target's choice
        for k, node in enumerate(s.accepted):
            assert t.parents[node] == (s.accepted[k - 1] if k else -1)
            assert t.tokens[node] == s.target_tokens[node]
        assert s.new_tokens == [t.tokens[n] for n in s.accepted] + [s.next_token]
        assert s.draft_ms >= 0 and s.verify_ms > 0
    assert sum(len(s.new_tokens) for s in gen.steps) == len(gen.token_ids)
    assert gen.stats.steps == len(gen.steps) - 1
    assert len(gen.stats.acceptance_by_depth) <= 4


def test_greedy_matches_transformers_generate(tiny_dir):
    """The engine's vanilla path agrees with Hugging Face's own greedy generate."""
    tgt = target(tiny_dir, "qwen2vl")
    ref = reference(tiny_dir, "qwen2vl", *PROMPTS[0])
    inputs = tgt.family.prefill_inputs(tgt.processor, image(0), PROMPTS[0][0])
    inputs = {k: v.to(tgt.device) for k, v in inputs.items()}
    with torch.no_grad():
        out = tgt.model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None)
    hf = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert hf == ref.token_ids


def test_padded_forwards_of_the_graph_path_are_lossless(tiny_dir, monkeypatch):
    """On a GPU every forward is padded to a power of two before its CUDA graph replays (and a chain
    is drafted in one graph); here the graphs' bodies run eagerly on the CPU (replay = plain call),
    so pad rows are checked to change nothing."""
    from mmspec import engine, model
    from mmspec.drafters import model as drafters  # ModelDrafter's module

    class Padded(model.CachedModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.graphs = self.room is not None

    monkeypatch.setattr(model.CachedModel, "_graph", lambda self, st, key, body, inputs, kind="decode": body(*inputs))
    monkeypatch.setattr(engine, "CachedModel", Padded)
    monkeypatch.setattr(drafters, "CachedModel", Padded)
    for family in ["llava", "qwen2vl"]:
        tgt = target(tiny_dir, family)
        drafter = load_drafter(str(tiny_dir / "text-draft"), tgt)
        prompt, seed = PROMPTS[1]
        ref = reference(tiny_dir, family, prompt, seed)
        for tree in ["dynamic:16,5,3", "chain:3"]:
            gen = generate(tgt, drafter, image(seed), prompt, DecodeConfig(max_new_tokens=N_NEW, tree=tree, static_cache=True))
            assert gen.token_ids == ref.token_ids, f"{family} {tree} padded"


def test_padded_prefill_matches_the_unpadded_one(tiny_dir, monkeypatch):
    """A graphed prefill pads the prompt to a multiple of 64 tokens: the last real position's logits,
    every layer's hidden states of the real positions and the cached K/V must be those of the
    unpadded prompt."""
    from mmspec import model

    monkeypatch.setattr(model.CachedModel, "_graph", lambda self, st, key, body, inputs, kind="decode": body(*inputs))
    for family in ["llava", "qwen2vl"]:
        tgt = target(tiny_dir, family)
        inputs = tgt.family.prefill_inputs(tgt.processor, image(3), PROMPTS[0][0])
        P = inputs["input_ids"].shape[1]
        assert P % 64, "the prompt must need padding for this test to mean anything"
        out = {}
        for padded in (False, True):
            cm = model.CachedModel(tgt.model, tgt.family, room=96)
            cm.graphs = padded  # graphed = padded; _graph runs the body eagerly here
            logits, hidden = cm.prefill(dict(inputs), hidden=True)
            keys = cm.cache.layers[-1].keys[..., :P, :].clone()
            out[padded] = (logits, hidden, keys, cm.committed)
            cm.release()
        (l0, h0, k0, c0), (l1, h1, k1, c1) = out[False], out[True]
        assert c0 == c1 == P
        torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
        assert len(h0) == len(h1) and all(a.shape == b.shape for a, b in zip(h0, h1))
        for a, b in zip(h0, h1):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k1, k0, atol=1e-4, rtol=1e-4)
        # As captured on a GPU: under the family's capture context (LLaVA: transformers' image-token
        # check, a host sync, replaced by the bare mask), with the same result.
        with tgt.family.graph_capture(tgt.model):
            cm = model.CachedModel(tgt.model, tgt.family, room=96)
            torch.testing.assert_close(cm.prefill(dict(inputs)), l0, atol=1e-4, rtol=1e-4)
            cm.release()
        assert "get_placeholder_mask" not in vars(getattr(tgt.model, "model", tgt.model))


def test_stacked_static_cache_keeps_the_same_rows_as_per_layer_buffers():
    """With every layer alike the static cache is one [L, 2, ...] tensor and accepting tree rows is
    one gather; it must keep exactly what moving rows layer by layer keeps."""
    from mmspec import kvcache

    torch.manual_seed(0)
    stacked, per_layer = kvcache.StaticKV(32, n_layers=3), kvcache.StaticKV(32)
    for cache in (stacked, per_layer):
        cache.write_pos = torch.arange(20)
        torch.manual_seed(1)
        for layer in range(3):
            cache.update(torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 4), layer)
        cache.length = 20
        kvcache.keep_rows(cache, 12, [0, 3, 5])
    assert stacked.stack is not None and per_layer.stack is None
    assert stacked.length == per_layer.length == 15
    for a, b in zip(stacked.layers, per_layer.layers):
        assert torch.equal(a.keys[..., :15, :], b.keys[..., :15, :])
        assert torch.equal(a.values[..., :15, :], b.values[..., :15, :])
    assert torch.equal(stacked.layers[1].keys[..., 13, :], stacked.stack[1, 0][..., 15, :])  # row 12+3 moved to 13


def test_a_draft_vlm_with_the_targets_processor_reuses_its_inputs(tiny_dir, monkeypatch):
    """The draft VLM prefills with the target's processed inputs when its processor would produce the
    same tensors (no second pass over the image); the text-only drafter never does."""
    from mmspec import families

    tgt = target(tiny_dir, "llava")
    calls = []
    real = families.Family.prefill_inputs
    monkeypatch.setattr(families.Family, "prefill_inputs",
                        lambda self, *a, **k: calls.append(self.name) or real(self, *a, **k))
    prompt, seed = PROMPTS[0]
    ref = reference(tiny_dir, "llava", prompt, seed)
    for name, own_call in ((str(tiny_dir / "llava-draft"), False), (str(tiny_dir / "text-draft"), True)):
        drafter = load_drafter(name, tgt)
        calls.clear()
        gen = generate(tgt, drafter, image(seed), prompt, DecodeConfig(max_new_tokens=8, tree="chain:3"))
        assert gen.token_ids == ref.token_ids[:8]
        assert calls == (["llava", "text"] if own_call else ["llava"]), name


def test_models_get_the_cache_argument_their_forward_takes(tiny_dir):
    """transformers' current `cache=`; the older `past_key_values=` only for a forward without it."""
    from mmspec.model import cache_argument

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    assert cache_argument(Old()) == "past_key_values"
    assert cache_argument(target(tiny_dir, "llava").model) == "cache"
    assert cache_argument(target(tiny_dir, "qwen2vl").model) == "cache"
