"""EAGLE-3 heads in the vLLM / SGLang / SpecForge format (mmspec.drafters.eagle3_head).

Heads are written here tensor by tensor from the format's description (not through the module under
test): random weights sized from a tiny target's config, a reduced and shuffled draft vocabulary
(non-trivial d2t), three distinct aux layers given in either engine's convention, with and without
their own embed_tokens. Checked: greedy output equals vanilla for chains, dynamic and static trees
on LLaVA and Qwen2-VL, with heads briefly fitted through `unroll` so that drafts are accepted
(random heads never are), on the eager path and on the engine's static-cache fast path, where the
drafts are the eager path's and those `tree.grow_tree` grows (chains and dynamic trees are drafted
by device bodies, replayed from CUDA graphs with MMSPEC_TEST_DEVICE=cuda); the first two draft
distributions equal a re-implementation of the format's forward written in this file; `unroll` (the
training pass) equals drafting at the first step and after accepted entries; sampling keeps the
target's distribution; bad heads are refused with one line; export writes exactly the tensors vLLM's
loader takes, and the exported head drafts the same (for the shipped head and the retired eagle3
feature drafter: test_shipped_eagle3.py).
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DEVICE, DTYPE
from mmspec import DecodeConfig, InputError, generate, load_drafter, load_target
from mmspec.cli import main as cli_main
from mmspec.drafters.base import DraftContext, Drafter
from mmspec.drafters.eagle3_head import aux_indices, create_head, engines_read, save_mmspec_head
from mmspec.model import CachedModel
from mmspec.tree import grow_tree, parse_tree_spec
from mmspec.verify import Sampling
from test_sampling import engine_pair_pvalue
from tiny_models import build_llava, build_qwen2_vl, image

PROMPT = "describe the image."
N_NEW = 24
TREES = ["chain:4", "dynamic:16,4,3", "static:[[0],[1],[0,0],[0,1],[1,0],[0,0,0]]"]
LAYERS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend on a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3")
    build_llava(root / "llava", seed=10, layers=LAYERS)
    build_qwen2_vl(root / "qwen2vl", seed=11, layers=LAYERS)
    return root


_targets: dict = {}


def target(tdir, family):
    if family not in _targets:
        _targets[family] = load_target(str(tdir / family), DEVICE, DTYPE)
    return _targets[family]


def text_cfg(tgt):
    c = tgt.model.config
    return getattr(c, "text_config", None) or c


# --- heads written straight from the format ---------------------------------------------------------


def head_tensors(tgt, hidden, heads, kv, inter, draft_ids, own_embed, seed, scale=0.08):
    """The format's tensors: names without a `model.` prefix, q/k/v over 2*hidden, fc over 3 target widths."""
    tc = text_cfg(tgt)
    Ht, V, d = tc.hidden_size, tc.vocab_size, hidden // heads
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * scale  # noqa: E731
    one = lambda: 1.0 + rnd(hidden)  # noqa: E731
    ids = torch.tensor(draft_ids)
    t = {
        "fc.weight": rnd(hidden, 3 * Ht) * 3, "midlayer.input_layernorm.weight": one(),
        "midlayer.hidden_norm.weight": one(), "midlayer.post_attention_layernorm.weight": one(),
        "midlayer.self_attn.q_proj.weight": rnd(heads * d, 2 * hidden) * 4,
        "midlayer.self_attn.k_proj.weight": rnd(kv * d, 2 * hidden) * 4,
        "midlayer.self_attn.v_proj.weight": rnd(kv * d, 2 * hidden), "midlayer.self_attn.o_proj.weight": rnd(hidden, heads * d),
        "midlayer.mlp.gate_proj.weight": rnd(inter, hidden), "midlayer.mlp.up_proj.weight": rnd(inter, hidden),
        "midlayer.mlp.down_proj.weight": rnd(hidden, inter), "norm.weight": one(),
        "lm_head.weight": rnd(len(draft_ids), hidden) * 3,
        "d2t": ids - torch.arange(len(ids)), "t2d": torch.zeros(V, dtype=torch.bool).index_fill_(0, ids, True),
    }
    if own_embed:
        t["embed_tokens.weight"] = rnd(V, hidden) * 10
    return t


def head_config(tgt, hidden, heads, kv, inter, n_draft, aux, style="vllm", mrope=None):
    tc = text_cfg(tgt)
    raw = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": hidden,
        "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter, "num_hidden_layers": 1,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "vocab_size": tc.vocab_size, "draft_vocab_size": n_draft,
        "target_hidden_size": tc.hidden_size, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }
    if style == "vllm":
        raw["eagle_aux_hidden_state_layer_ids"] = list(aux)
    elif style == "sglang":  # SpecForge writes decoder-output ids; SGLang adds one
        raw["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux], "use_aux_hidden_state": True}
    if mrope:
        raw["rope_scaling"] = {"type": "mrope", "mrope_section": list(mrope)}
    return raw


def draft_vocab(tgt, frac=0.6, seed=0, keep=()):
    """A reduced draft vocabulary in shuffled (not ascending) order: d2t is neither zero nor monotone.
    `keep`: target ids it must hold (as a frequency-chosen vocabulary would hold the common tokens)."""
    V = text_cfg(tgt).vocab_size
    g = torch.Generator().manual_seed(seed)
    rest = [t for t in torch.randperm(V, generator=g).tolist() if t not in set(keep)]
    ids = list(dict.fromkeys(keep)) + rest[: int(V * frac) - len(set(keep))]
    return [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]


# aux layers listed out of order on purpose: the engines concatenate lowest layer first.
SPECS = {
    "plain": dict(hidden=64, heads=4, kv=2, inter=96, own_embed=False, aux=(3, 0, 2), style="vllm"),
    "own-embed-narrow": dict(hidden=48, heads=4, kv=2, inter=80, own_embed=True, aux=(1, 3, 2), style="sglang",
                             config={"norm_before_residual": True}),
}
MROPE = {"plain": (2, 3, 3), "own-embed-narrow": (2, 2, 2)}  # halves of head_dim 16 and 12


def write_head(path, tgt, spec, seed=0, mrope=None, config_over=None, tensors_over=None, keep=()):
    s = dict(SPECS[spec])
    ids = draft_vocab(tgt, seed=seed, keep=keep)
    t = head_tensors(tgt, s["hidden"], s["heads"], s["kv"], s["inter"], ids, s["own_embed"], seed)
    raw = head_config(tgt, s["hidden"], s["heads"], s["kv"], s["inter"], len(ids), s["aux"], s["style"], mrope)
    raw.update({**s.get("config", {}), **(config_over or {})})
    for k, v in (tensors_over or {}).items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in t.items()}, str(path / "model.safetensors"))
    return path


_refs: dict = {}


def vanilla(tdir, family):
    if family not in _refs:
        _refs[family] = generate(target(tdir, family), None, image(0), PROMPT, DecodeConfig(max_new_tokens=N_NEW))
    return _refs[family]


# --- losslessness -----------------------------------------------------------------------------------


def whole_sequence(inputs, full):
    """The prefill inputs grown to the token ids `full` (attention mask, token types: the added tokens are text)."""
    P = inputs["input_ids"].shape[1]
    seq = {k: torch.cat([v, v[:, -1:].expand(1, len(full) - P)], 1) if v.dim() == 2 and v.shape == (1, P) else v
           for k, v in inputs.items()}
    seq["input_ids"] = torch.tensor([full])
    return {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in seq.items()}


@torch.no_grad()
def sequence_aux(tgt, d, inputs, full):
    """The head's aux features [len(full), 3 * Ht] from the target's forward over the whole sequence."""
    hs = tgt.model(**whole_sequence(inputs, full), output_hidden_states=True).hidden_states
    return torch.cat([hs[i][0] for i in d.target_layers], -1)


def fit(tgt, d, tokens_out, steps=12, depth=3):
    """Teacher-force the loaded head on one continuation with `unroll` (the trainer's pass): cross-
    entropy on the draft vocabulary for depths 1..3, 0.8**j weights. Random heads are never accepted;
    a fitted one is, so the tests below also exercise accepted paths, bonus tokens and rollback."""
    from mmspec.drafters.eagle3_head import unroll

    img = image(0)
    inputs = tgt.family.prefill_inputs(tgt.processor, img, PROMPT)
    P = inputs["input_ids"].shape[1]
    full = inputs["input_ids"][0].tolist() + tokens_out
    aux = sequence_aux(tgt, d, inputs, full)[:-1]  # entry p: features p, token p + 1
    n = aux.shape[0]
    tm = CachedModel(tgt.model, tgt.family)
    tm.prefill(inputs)
    d.start(DraftContext(img, PROMPT, full[:P], tgt, tm, aux[:P].view(P, 3, -1).transpose(0, 1), None, False, inputs))
    pos = d._positions(0, n)
    d.finish()
    draft_id = torch.full((d.cfg.vocab,), -1, device=DEVICE)
    draft_id[d.head.target_ids()] = torch.arange(d.cfg.draft_vocab, device=DEVICE)
    tokens = torch.tensor(full + [0] * depth, device=DEVICE)
    opt = torch.optim.Adam(d.head.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = 0.0
        for j, logits in enumerate(unroll(d.head, aux, tokens, pos, depth)):
            label = draft_id[tokens[2 + j : 2 + j + n]]  # depth j + 1 at entry p predicts token p + 2 + j
            label[: P - 2] = -1  # the prompt is the processor's, not the model's: no loss there
            label[max(0, len(full) - 2 - j):] = -1  # beyond the sequence
            loss = loss + 0.8 ** j * torch.nn.functional.cross_entropy(logits.float(), label, ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1]


_fitted: dict = {}


def fitted(tdir, family, spec):
    """The head of `spec` for `family`'s target, fitted once per module: (drafter, first loss, last loss)."""
    if (family, spec) not in _fitted:
        tgt = target(tdir, family)
        ref = vanilla(tdir, family).token_ids
        mrope = MROPE[spec] if family == "qwen2vl" else None
        d = load_drafter(str(write_head(tdir / f"head-{family}-{spec}", tgt, spec, mrope=mrope, keep=ref)), tgt)
        _fitted[family, spec] = (d, *fit(tgt, d, ref))
    return _fitted[family, spec]


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_greedy_equals_vanilla(tdir, family, spec):
    """On the eager path and on the engine's static-cache fast path (chains and dynamic trees drafted
    by the device bodies, static trees grown on the host over the same buffers)."""
    tgt, ref = target(tdir, family), vanilla(tdir, family).token_ids
    d, first, last = fitted(tdir, family, spec)
    assert d.target_layers == tuple(sorted(SPECS[spec]["aux"]))
    assert last < 0.5 * first
    accepted = 0
    for tree in TREES:
        for static in (False, True):
            gen = generate(tgt, d, image(0), PROMPT, DecodeConfig(max_new_tokens=N_NEW, tree=tree, static_cache=static))
            assert gen.token_ids == ref, (tree, static)
            assert gen.drafter_info["target_layers"] == list(d.target_layers)
            accepted += sum(s.accepted_len for s in gen.steps)
    assert accepted >= 2 * N_NEW, "drafts must be accepted, or greedy equality proves little"


class Recorder(Drafter):
    """Hands every call to an EAGLE-3 drafter and keeps each step's drafts (tokens, parents, q of
    each token, q rows, forwards). For greedy chains and dynamic trees it also grows the tree the
    host's way (`tree.grow_tree` over the drafter's buffers, as static trees are grown) right after
    the device drafted it, and checks that both drafted the same."""

    def __init__(self, d, grow_at: int | None = None):
        self.d, self.name, self.target_layers = d, d.name, d.target_layers
        self.steps, self.graphed, self.graphs = [], False, None
        self.grow_at, self.caps = grow_at, []  # before step `grow_at`, larger buffers take over

    def start(self, ctx):
        self.d.start(ctx)

    def observe(self, target_hidden, tokens):
        self.d.observe(target_hidden, tokens)

    def info(self):
        return self.d.info()

    def finish(self):
        if self.d.buf is not None:  # (graphs captured, capture errors) of the buffers the request used
            self.graphs = (len(self.d.buf.graphs.captured), dict(self.d.buf.graphs.graph_error))
        self.d.finish()

    def propose(self, committed, spec, sampling, gen):
        if len(self.steps) == self.grow_at:
            self.d._reserve(self.d.buf.cap + 1)
        self.caps.append(self.d.buf.cap)
        prop = self.d.propose(committed, spec, sampling, gen)
        self.graphed |= self.d.req.graphed
        on_device = prop.device_tokens is not None
        # A device tree reaches the host when the engine resolves it; read it here without resolving.
        tree, proposals = prop.device_tree.host() if prop.device_tree is not None else (prop.tree, prop.proposals)
        tokens = prop.device_tokens.tolist() if on_device else list(tree.tokens)
        probs = prop.device_probs.tolist() if on_device else list(tree.draft_probs)
        q = {k: v.double().cpu() for k, v in proposals.items()}
        self.steps.append((tokens, list(tree.parents), probs, q, prop.extras["drafter_forwards"]))
        if spec.kind != "static" and sampling.greedy:
            self._check_host(spec, sampling, tokens, tree.parents, probs, q)
        return prop

    def _check_host(self, spec, sampling, tokens, parents, probs, q):
        host = grow_tree(self.d._tree_expander(sampling), spec, False, None)
        assert (host.tree.tokens, host.tree.parents) == (tokens, parents), spec
        assert np.allclose(host.tree.draft_probs, probs, atol=1e-5), spec
        assert host.proposals.keys() == q.keys()
        for k, row in q.items():
            torch.testing.assert_close(host.proposals[k].double().cpu(), row, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_fast_path_drafts_equal_eager_and_host_grown(tdir, family, spec):
    """The static-cache fast path (its bodies replayed from CUDA graphs with MMSPEC_TEST_DEVICE=cuda,
    run eagerly on the CPU) drafts what the eager path drafts, step by step: same trees, q of each
    token and q rows within float noise, same forwards; and the device's chains and dynamic trees
    are the trees `tree.grow_tree` grows from the same state."""
    tgt, ref = target(tdir, family), vanilla(tdir, family).token_ids
    d = fitted(tdir, family, spec)[0]
    for tree in TREES:
        runs = {}
        for static in (False, True):
            rec = Recorder(d)
            gen = generate(tgt, rec, image(0), PROMPT, DecodeConfig(max_new_tokens=N_NEW, tree=tree, static_cache=static))
            assert gen.token_ids == ref, (tree, static)
            assert rec.graphed == (static and DEVICE == "cuda")
            if rec.graphed:
                assert rec.graphs[0] > 0 and not rec.graphs[1], rec.graphs
            runs[static] = ([s.accepted for s in gen.steps], rec.steps)
        (acc_a, a), (acc_b, b) = runs[False], runs[True]
        assert acc_a == acc_b and len(a) == len(b) >= 4, tree
        for i, (sa, sb) in enumerate(zip(a, b)):  # (the target's two cache paths differ in float rounding)
            assert (sa[0], sa[1], sa[4]) == (sb[0], sb[1], sb[4]), (tree, i)
            assert np.allclose(sa[2], sb[2], atol=1e-4), (tree, i)
            assert sa[3].keys() == sb[3].keys()
            for k in sa[3]:
                torch.testing.assert_close(sa[3][k], sb[3][k], atol=1e-4, rtol=1e-3)


def test_buffers_grown_mid_request_draft_the_same(tdir):
    """Eagerly the buffers grow when full (`_reserve`: larger ones take over the committed rows)."""
    tgt, ref = target(tdir, "qwen2vl"), vanilla(tdir, "qwen2vl").token_ids
    d = fitted(tdir, "qwen2vl", "plain")[0]
    runs = []
    for grow_at in (None, 3):
        rec = Recorder(d, grow_at)
        gen = generate(tgt, rec, image(0), PROMPT, DecodeConfig(max_new_tokens=N_NEW, tree=TREES[1]))
        assert gen.token_ids == ref
        runs.append(rec)
    assert len(set(runs[0].caps)) == 1 and runs[1].caps[3] > runs[1].caps[2] == runs[0].caps[0]
    for a, b in zip(runs[0].steps, runs[1].steps):
        assert (a[0], a[1], a[4]) == (b[0], b[1], b[4])
        for k in a[3]:
            torch.testing.assert_close(a[3][k], b[3][k], atol=1e-5, rtol=1e-4)


# --- the format's forward, written independently --------------------------------------------------------


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x, pos, theta, section):
    """RoPE on x [h, T, d] at positions pos [T] or, with M-RoPE, [3, T]: frequency j of the
    half-dimension takes its position from the axis whose section contains j."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if section is None:
        ang = pos.double()[:, None] * inv
    else:
        axis = torch.repeat_interleave(torch.arange(3), torch.tensor(section))
        ang = pos.double()[axis].T * inv  # [T, d/2]: frequency j uses the position on axis[j]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _layer(w, raw, hidden_in, emb, pos, keys=None):
    """The midlayer over entries (hidden_in, emb) [T, H] at RoPE positions pos; keys = (k, v) of earlier
    entries (all visible). Returns the pre-norm x [T, H], logits over the draft vocabulary, and (k, v) so far."""
    T = hidden_in.shape[0]
    h = _rms(hidden_in, w["midlayer.hidden_norm.weight"])
    a_in = torch.cat([_rms(emb, w["midlayer.input_layernorm.weight"]), h], -1)
    nh, nkv = raw["num_attention_heads"], raw["num_key_value_heads"]
    d = raw["hidden_size"] // nh
    section, theta = (raw.get("rope_scaling") or {}).get("mrope_section"), raw["rope_theta"]
    proj = lambda name, n: (a_in @ w[f"midlayer.self_attn.{name}_proj.weight"].T).view(T, n, d).transpose(0, 1)  # noqa: E731
    q, k, v = _rotate(proj("q", nh), pos, theta, section), _rotate(proj("k", nkv), pos, theta, section), proj("v", nkv)
    if keys is not None:
        k, v = torch.cat([keys[0], k], 1), torch.cat([keys[1], v], 1)
    S = k.shape[1]
    att = (q @ k.repeat_interleave(nh // nkv, 0).transpose(1, 2)) / d ** 0.5
    visible = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # earlier entries, then causal among the new
    att = att.masked_fill(~visible, float("-inf")).softmax(-1)
    residual = h if raw.get("norm_before_residual") else hidden_in
    x = residual + ((att @ v.repeat_interleave(nh // nkv, 0)).transpose(0, 1).reshape(T, -1)
                     @ w["midlayer.self_attn.o_proj.weight"].T)
    m = _rms(x, w["midlayer.post_attention_layernorm.weight"])
    gate, up = m @ w["midlayer.mlp.gate_proj.weight"].T, m @ w["midlayer.mlp.up_proj.weight"].T
    x = x + (torch.nn.functional.silu(gate) * up) @ w["midlayer.mlp.down_proj.weight"].T
    return x, _rms(x, w["norm.weight"]) @ w["lm_head.weight"].T, (k, v)


def _on_target_vocab(w, raw, logits, temperature):
    q = torch.zeros(raw["vocab_size"], dtype=torch.float64)
    q[torch.arange(len(w["d2t"])) + w["d2t"]] = torch.softmax(logits / temperature, -1)
    return q


@torch.no_grad()
def reference_q(tgt, head_dir, inputs, first, second, temperature):
    """The first two draft distributions over the target vocabulary from the files and the target's
    own forward: step 1 reads fc(aux), step 2 (after drafting `second`) feeds back step 1's pre-norm x."""
    raw = json.loads((head_dir / "config.json").read_text())
    w = {k: v.double() if v.is_floating_point() else v for k, v in load_file(str(head_dir / "model.safetensors")).items()}
    if "eagle_aux_hidden_state_layer_ids" in raw:
        aux = sorted(raw["eagle_aux_hidden_state_layer_ids"])
    else:
        aux = sorted(i + 1 for i in raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    # the target runs where the tests put it; the reference itself is float64 on the host
    inputs = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs.items()}
    hs = [h[0].double().cpu() for h in tgt.model(**inputs, output_hidden_states=True).hidden_states]
    ids = inputs["input_ids"][0].tolist()
    P = len(ids)
    emb_w = (w["embed_tokens.weight"] if "embed_tokens.weight" in w
             else tgt.model.get_input_embeddings().weight.detach().double().cpu())
    if (raw.get("rope_scaling") or {}).get("mrope_section") is None:
        pos = torch.arange(P + 1)
    else:  # the target's 3-D positions; the drafted token one further on every axis
        kw = {k: inputs[k] for k in ("image_grid_thw", "attention_mask", "mm_token_type_ids") if k in inputs}
        pos = tgt.model.model.get_rope_index(inputs["input_ids"], **kw)[0][:, 0].cpu()
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    emb = emb_w[torch.tensor(ids[1:] + [first])]  # entry p: token p + 1; the last is the sampled token
    h = torch.cat([hs[i] for i in aux], -1) @ w["fc.weight"].T
    x, logits, keys = _layer(w, raw, h, emb, pos[..., :P])
    _, logits2, _ = _layer(w, raw, x[-1:], emb_w[[second]], pos[..., P:], keys)
    return _on_target_vocab(w, raw, logits[-1], temperature), _on_target_vocab(w, raw, logits2[0], temperature)


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_draft_distributions_match_the_format(tdir, tmp_path, family, spec):
    tgt = target(tdir, family)
    head_dir = write_head(tmp_path / "head", tgt, spec, seed=3, mrope=MROPE[spec] if family == "qwen2vl" else None)
    d = load_drafter(str(head_dir), tgt)
    img = image(1)
    inputs = tgt.family.prefill_inputs(tgt.processor, img, PROMPT)
    tm = CachedModel(tgt.model, tgt.family)
    logits, hidden = tm.prefill(inputs, hidden=True)
    first = int(logits.argmax())
    feats = torch.stack([hidden[i][0] for i in d.target_layers])
    d.start(DraftContext(img, PROMPT, inputs["input_ids"][0].tolist(), tgt, tm, feats, None, False, inputs))
    prop = d.propose([first], parse_tree_spec("chain:2"), Sampling(0.8, 1.0), torch.Generator().manual_seed(0))
    prop.resolve()  # the chain was drafted on the device: its tokens reach the tree here
    want = reference_q(tgt, head_dir, inputs, first, prop.tree.tokens[0], 0.8)
    for node, q in zip((-1, 0), want):
        got = prop.proposals[node].double().cpu()
        assert (got[q == 0] == 0).all(), "tokens outside the draft vocabulary must have probability 0"
        assert q.max() < 0.9, "a near one-hot distribution would hide errors"
        torch.testing.assert_close(got, q, atol=2e-5, rtol=1e-4)


def target_positions(tgt, inputs, full):
    """RoPE positions of the whole sequence as the target computes them: its own 3-D rope index
    (Qwen2-VL; the head is M-RoPE) or sequence indices (LLaVA; a 1-D head)."""
    if tgt.family.name != "qwen2_vl":
        return torch.arange(len(full))
    seq = whole_sequence(inputs, full)
    kw = {k: seq[k] for k in ("image_grid_thw", "attention_mask", "mm_token_type_ids") if k in seq}
    return tgt.model.model.get_rope_index(seq["input_ids"], **kw)[0][:, 0]


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_training_unroll_matches_drafting(tdir, tmp_path, family, monkeypatch):
    """`unroll` (the trainer's teacher-forced pass over the whole sequence, at the target's own
    positions) gives the distributions the drafter proposes when its chain is forced along the true
    continuation (a chain-shaped static tree: grown by grow_tree, which the test replaces), at the
    first step and at a later one after `m` committed entries (fed by the step body)."""
    import mmspec.drafters.eagle3_head as e3
    from mmspec import device_tree
    from mmspec.tree import TreePool, _finish

    tgt = target(tdir, family)
    head_dir = write_head(tmp_path / "head", tgt, "plain", seed=5, mrope=MROPE["plain"] if family == "qwen2vl" else None)
    d = load_drafter(str(head_dir), tgt)
    img, depth, m = image(4), 3, 3
    inputs = tgt.family.prefill_inputs(tgt.processor, img, PROMPT)
    P = inputs["input_ids"].shape[1]
    out = generate(tgt, None, img, PROMPT, DecodeConfig(max_new_tokens=m + depth + 1)).token_ids
    full = inputs["input_ids"][0].tolist() + out
    aux = sequence_aux(tgt, d, inputs, full)
    rows = []

    def forced_chain(expand, spec, sample, gen):
        root = d.req.n_cache - 1  # entry of the last committed position
        pool, q, parent = TreePool(), {}, -1
        for j in range(depth):
            q[parent] = expand(pool, [parent])[0]
            rows.append((root, j, q[parent]))
            parent = pool.add(full[root + 2 + j], parent, 0.0, 0.0)
        return _finish(pool, list(range(len(pool.tokens))), q)

    monkeypatch.setattr(device_tree, "grow_tree", forced_chain)  # static shapes are grown there
    tm = CachedModel(tgt.model, tgt.family)
    tm.prefill(inputs)
    d.start(DraftContext(img, PROMPT, full[:P], tgt, tm, aux[:P].view(P, 3, -1).transpose(0, 1), None, False, inputs))
    chain = parse_tree_spec(f"static:{[[0] * j for j in range(1, depth + 1)]}")
    d.propose(full[P : P + 1], chain, Sampling(0.0), None)
    d.observe(aux[P : P + m].view(m, 3, -1).transpose(0, 1), full[P : P + m])
    d.propose(full[P : P + 1 + m], chain, Sampling(0.0), None)
    assert [(r, j) for r, j, _ in rows] == [(P - 1, j) for j in range(depth)] + [(P - 1 + m, j) for j in range(depth)]
    n = P + m
    pos = target_positions(tgt, inputs, full)[..., :n]
    with torch.no_grad():
        logits = e3.unroll(d.head, aux[:n], torch.tensor(full[: n + depth]), pos, depth)
    for root, j, row in rows:
        want = torch.softmax(d.head.target_logits(logits[j][root].float()), -1)
        torch.testing.assert_close(row, want, atol=1e-5, rtol=1e-4)


# --- sampling ---------------------------------------------------------------------------------------


def agreeing_head(tgt, path, draft_ids):
    """A head that re-runs the target's last decoder layer: fc picks hidden_states[L-1], q/k/v read
    only the hidden half (the target's weights), hidden_norm / o / MLP / norms / lm_head are the
    target's. Its first draft is the target's distribution one position back (for the token just
    committed) on the draft vocabulary: on this peaky, repetitive target often accepted, often not
    (measured: 0.21 accepted drafts per run for chain:3, 0.40 for dynamic:8,3,3)."""
    from mmspec.entropy import text_model

    tc = text_cfg(tgt)
    H, L, I = tc.hidden_size, tc.num_hidden_layers, tc.intermediate_size
    last = text_model(tgt.model).layers[L - 1]
    t = head_tensors(tgt, H, tc.num_attention_heads, tc.num_key_value_heads, I, draft_ids, False, seed=7)
    own = lambda m: m.weight.detach().clone()  # noqa: E731
    t["fc.weight"] = torch.cat([torch.zeros(H, 2 * H), torch.eye(H)], 1)
    t["midlayer.hidden_norm.weight"] = own(last.input_layernorm)
    t["midlayer.post_attention_layernorm.weight"] = own(last.post_attention_layernorm)
    for n in ("q", "k", "v"):
        w = own(getattr(last.self_attn, f"{n}_proj"))
        t[f"midlayer.self_attn.{n}_proj.weight"] = torch.cat([torch.zeros_like(w), w], 1)
    t["midlayer.self_attn.o_proj.weight"] = own(last.self_attn.o_proj)
    for n in ("gate", "up", "down"):
        t[f"midlayer.mlp.{n}_proj.weight"] = own(getattr(last.mlp, f"{n}_proj"))
    t["norm.weight"] = own(text_model(tgt.model).norm)
    t["lm_head.weight"] = tgt.model.get_output_embeddings().weight.detach()[torch.tensor(draft_ids)].clone()
    raw = head_config(tgt, H, tc.num_attention_heads, tc.num_key_value_heads, I, len(draft_ids), (0, 1, L - 1))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in t.items()}, str(path / "model.safetensors"))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("tree,static", [("chain:3", None), ("dynamic:8,3,3", True),
                                         ("static:[[0],[1],[0,0],[1,0]]", None)])
# static=True: the engine's static-cache fast path (Gumbel noise drawn by DeviceNoise, the tree grown
# by device_tree in the step body); static trees are grown by grow_tree over the drafter's buffers.
def test_sampling_keeps_the_target_distribution(tmp_path_factory, tree, static):
    root = tmp_path_factory.mktemp("eagle3-peaky")
    tgt = load_target(str(build_llava(root / "t", seed=12, layers=LAYERS, peaky=12.0)), DEVICE, DTYPE)
    d = load_drafter(str(agreeing_head(tgt, root / "head", draft_vocab(tgt, frac=0.7, seed=5))), tgt)
    pvalue, accepted = engine_pair_pvalue(tgt, d, tree, n=600, static_cache=static)
    assert accepted > 0.2, "the head should get some drafts accepted, or the test proves little"
    assert pvalue > 1e-3


# --- refusals ---------------------------------------------------------------------------------------


# case -> (how the head is spoiled, a word the refusal must contain)
BAD = {
    "wrong target width": (dict(config_over={"target_hidden_size": 32}), "width"),
    "missing tensor": (dict(tensors_over={"midlayer.hidden_norm.weight": None}), "missing"),
    "vocab mismatch": (dict(config_over={"vocab_size": 999}), "vocab_size"),
    "d2t collides": ({}, "d2t"),  # the colliding d2t is built in the test (it needs the draft size)
    "aux outside the target": (dict(config_over={"eagle_aux_hidden_state_layer_ids": [0, 1, LAYERS]}), "outside"),
    "conventions disagree": (dict(config_over={"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}}),
                             "disagree"),
    "extra tensor": (dict(tensors_over={"fc.bias": torch.zeros(64)}), "unexpected"),
    "unsupported option": (dict(config_over={"norm_before_fc": True}), "norm_before_fc"),
    "unsupported rope": (dict(config_over={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), "yarn"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_heads_are_refused_with_one_line(tdir, tmp_path, case, capsys):
    tgt = target(tdir, "llava")
    over, word = BAD[case]
    if case == "d2t collides":  # draft ids 0 and 1 both onto target id 5
        n = len(draft_vocab(tgt))
        over = {"tensors_over": {"d2t": torch.cat([torch.tensor([5, 4]), torch.zeros(n - 2, dtype=torch.long)])}}
    path = write_head(tmp_path / "bad", tgt, "plain", **over)
    with pytest.raises(InputError, match=word):
        load_drafter(str(path), tgt)
    rc = cli_main(["generate", "--target", str(tdir / "llava"), "--drafter", str(path), "--prompt", PROMPT,
                   "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err  # (transformers' loading progress bar also writes here)
    assert rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]


def test_pytorch_bin_heads_load_like_safetensors(tdir, tmp_path):
    """The original EAGLE-3 releases ship pytorch_model.bin (vLLM reads both)."""
    tgt = target(tdir, "llava")
    st = write_head(tmp_path / "st", tgt, "plain")
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((st / "config.json").read_text())
    torch.save({f"model.{k}" if k.startswith("midlayer") else k: v for k, v in load_file(str(st / "model.safetensors")).items()},
               binary / "pytorch_model.bin")  # some trainers keep a `model.` prefix: read as bare names
    a, b = (generate(tgt, load_drafter(str(p), tgt), image(0), PROMPT, DecodeConfig(max_new_tokens=12)) for p in (st, binary))
    assert [s.tree.tokens for s in a.steps] == [s.tree.tokens for s in b.steps]


def test_full_vocabulary_head_may_omit_d2t_and_t2d(tdir, tmp_path):
    tgt = target(tdir, "llava")
    V = text_cfg(tgt).vocab_size
    path = write_head(tmp_path / "full", tgt, "plain", config_over={"draft_vocab_size": None},
                      tensors_over={"d2t": None, "t2d": None, "lm_head.weight": torch.randn(V, 64) * 0.2})
    d = load_drafter(str(path), tgt)
    assert d.cfg.draft_vocab == V and torch.equal(d.head.target_ids().cpu(), torch.arange(V))
    gen = generate(tgt, d, image(0), PROMPT, DecodeConfig(max_new_tokens=N_NEW, tree=TREES[1]))
    assert gen.token_ids == vanilla(tdir, "llava").token_ids
    reduced = write_head(tmp_path / "reduced", tgt, "plain", tensors_over={"d2t": None})
    with pytest.raises(InputError, match="d2t"):
        load_drafter(str(reduced), tgt)


def test_aux_layer_conventions():
    assert aux_indices({"eagle_aux_hidden_state_layer_ids": [13, 2, 8]}, 16)[0] == (2, 8, 13)
    assert aux_indices({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 7, 12]}}, 16)[0] == (2, 8, 13)
    assert aux_indices({}, 16)[0] == (2, 8, 13)
    with pytest.raises(InputError):
        aux_indices({"eagle_aux_hidden_state_layer_ids": [2, 2, 8]}, 16)
    # A SpecForge config served by vLLM: vLLM ignores eagle_config and falls back to its default.
    assert dict(engines_read({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 5, 9]}}, 16)) == {
        "vLLM": (2, 8, 13), "SGLang": (1, 6, 10)}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_mrope_layout_matches_transformers(family):
    """The head's M-RoPE (block layout for Qwen2-VL heads, interleaved for Qwen3-VL heads) against
    transformers' own rotary embedding of that family, at random 3-D positions."""
    import importlib

    from mmspec.drafters.eagle3_head import Eagle3Head, HeadConfig
    from mmspec.drafters.feature.net import apply_rope

    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    conf = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    section, d = [4, 6, 6], 32
    Text = conf.Qwen2VLTextConfig if family == "qwen2_vl" else conf.Qwen3VLTextConfig
    rope = {"rope_type": "default", "rope_theta": 5000.0, "mrope_section": section}
    if family == "qwen3_vl":
        rope["mrope_interleaved"] = True
    tc = Text(hidden_size=4 * d, num_attention_heads=4, head_dim=d, rope_parameters=rope)
    Rot = mod.Qwen2VLRotaryEmbedding if family == "qwen2_vl" else mod.Qwen3VLTextRotaryEmbedding
    pos = torch.randint(0, 300, (3, 1, 7))
    cos, sin = Rot(tc)(torch.zeros(1, dtype=torch.float32), pos)
    cfg = HeadConfig(hidden=4 * d, heads=4, kv_heads=4, head_dim=d, intermediate=8, eps=1e-6, rope_theta=5000.0, vocab=8,
                     draft_vocab=8, target_hidden=4 * d, aux=(0, 1, 2), aux_source="test", mrope_section=tuple(section),
                     mrope_interleaved=family == "qwen3_vl")
    got_cos, got_sin = Eagle3Head(cfg).rope(pos[:, 0])
    torch.testing.assert_close(got_cos[0, 0], cos[0].float())
    # mmspec folds rotate-half's sign into sin: compare what matters, the rotation of a query
    x = torch.randn(1, 4, 7, d)
    want = x * cos[:, None] + mod.rotate_half(x) * sin[:, None]
    torch.testing.assert_close(apply_rope(x, got_cos, got_sin), want)


# --- export -----------------------------------------------------------------------------------------


def vllm_expected(raw, own_embed):
    """What vLLM's Eagle3 loader takes for a one-layer head (t2d is read and skipped; embed_tokens optional)."""
    H, I = raw["hidden_size"], raw["intermediate_size"]
    d = raw.get("head_dim") or H // raw["num_attention_heads"]
    qo, kv = raw["num_attention_heads"] * d, raw["num_key_value_heads"] * d
    want = {"fc.weight": [H, 3 * raw["target_hidden_size"]], "norm.weight": [H], "lm_head.weight": [raw["draft_vocab_size"], H],
            "d2t": [raw["draft_vocab_size"]], "t2d": [raw["vocab_size"]],
            "midlayer.self_attn.q_proj.weight": [qo, 2 * H], "midlayer.self_attn.k_proj.weight": [kv, 2 * H],
            "midlayer.self_attn.v_proj.weight": [kv, 2 * H], "midlayer.self_attn.o_proj.weight": [H, qo],
            "midlayer.mlp.gate_proj.weight": [I, H], "midlayer.mlp.up_proj.weight": [I, H],
            "midlayer.mlp.down_proj.weight": [H, I]}
    want.update({f"midlayer.{n}.weight": [H] for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")})
    if own_embed:
        want["embed_tokens.weight"] = [raw["vocab_size"], H]
    return want


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_export_then_load_drafts_the_same(tdir, tmp_path, family):
    tgt = target(tdir, family)
    d = create_head(tgt, aux=(1, 2, 3), draft_ids=draft_vocab(tgt, seed=9), seed=4)
    with torch.no_grad():
        for p in d.head.parameters():
            p.add_((torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05).to(p.device, p.dtype))
    src = save_mmspec_head(d, tmp_path / "mmspec-head", {"trained": True})
    assert cli_main(["export-eagle3", str(src), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLMEagle3"] and not (out / "mmspec_drafter.json").exists()
    assert raw["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    rope = raw.get("rope_scaling") or {}
    assert (family == "qwen2vl") == ("mrope_section" in rope)
    assert not ("type" in rope and "rope_type" in rope), "vLLM refuses both keys when they differ"
    assert raw["max_position_embeddings"] == text_cfg(tgt).max_position_embeddings
    shapes = {k: list(v.shape) for k, v in load_file(str(out / "model.safetensors")).items()}
    assert shapes == vllm_expected(raw, own_embed=False)
    a, b = load_drafter(str(src), tgt), load_drafter(str(out), tgt)
    for tree in TREES:
        ga, gb = (generate(tgt, x, image(2), PROMPT, DecodeConfig(max_new_tokens=16, tree=tree)) for x in (a, b))
        assert [s.tree.tokens for s in ga.steps] == [s.tree.tokens for s in gb.steps]
        assert ga.token_ids == gb.token_ids == generate(tgt, None, image(2), PROMPT, DecodeConfig(max_new_tokens=16)).token_ids

