"""EAGLE-3 heads in the format vLLM, SGLang and SpecForge share: load one, draft with it, export one.

A head directory holds `config.json` (`architectures: ["LlamaForCausalLMEagle3"]`, Llama fields,
`draft_vocab_size`, the aux-layer ids) and `model.safetensors` with, without any `model.` prefix
(vLLM's loader prepends `model.` to every name but `lm_head` and `d2t`):
  fc.weight [H, 3*Ht]                              over the concatenated aux hidden states (Ht = the target's width)
  midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight [H]
  midlayer.self_attn.{q,k,v}_proj.weight [heads*d | kv*d, 2H], o_proj [H, heads*d]
  midlayer.mlp.{gate,up}_proj.weight [I, H], down_proj [H, I]
  norm.weight [H], lm_head.weight [Vd, H]
  d2t int64 [Vd] (target id = draft id + d2t[draft id]), t2d bool [V] (the engines ignore it)
  embed_tokens.weight [V, H]                       optional: without it the target's embeddings are used

One step over entries (hidden_in, token): x = r + o(attn([input_layernorm(emb(token)), hidden_norm(hidden_in)]))
with r = hidden_in (or hidden_norm(hidden_in) when `norm_before_residual`), then x += mlp(post_norm(x));
the draft logits are lm_head(norm(x)) over the draft vocabulary, and x (pre-norm) is what later steps
feed back as their hidden_in. Entry p of the committed sequence pairs the target's aux features at
position p (hidden_in = fc(aux[p])) with token p + 1 and sits at the target's RoPE position of p.

Which target layers (checked against vLLM's `llama.py` / `interfaces.py` and SGLang's models):
both engines collect "aux layer i" as `hidden_states + residual` just *before* decoder layer i runs,
i.e. the residual stream entering layer i = HF `hidden_states[i]` (0 = the embeddings). vLLM passes
the top-level `eagle_aux_hidden_state_layer_ids` through unchanged; SGLang (and SpecForge, which
trains for it) read `eagle_config.eagle_aux_hidden_state_layer_ids` and add one; with neither both
default to (2, L//2, L-3). They concatenate in layer order, lowest first, whatever the list order.
HF's `hidden_states[L]` is the *final-normed* output where the engines would read the pre-norm
stream, so ids must stay below L.

Lossless verification needs the draft distribution over the target's vocabulary: the draft logits
are scattered to the target ids (d2t) and every other id gets -inf (vLLM's `compute_logits`), so
tokens outside the draft vocabulary have draft probability 0 and are only ever sampled from the
residual.

Drafting (`Eagle3HeadDrafter`) keeps the committed entries' KV rows and fc(aux) features in
preallocated buffers; chains and EAGLE-2 dynamic trees are drafted by one body per step on the
device (feed the entries committed since the last step, then draft; replayed from CUDA graphs on
the engine's static-cache path on a GPU), static trees are grown by `tree.grow_tree` over them.

M-RoPE (`rope_scaling` with `mrope_section`, or type "mrope"): entries take the target's own 3-D
positions (the prompt's from the family's rope index, later ones index + rope delta on all axes)
and tree node at depth d sits at the root entry's position + d on all three axes (vLLM's
`positions += 1`). A 1-D head uses sequence indices (for a 1-D target they are its positions).

Training one here (what `mmspec.train_eagle3` does; mmspec's shipped EAGLE-3 drafter,
assets/models/mmspec-feat-eagle3, is such a head): `create_head(target, aux, draft_ids)` builds a
format head (lm_head rows copied from the target's for the draft vocabulary, the target's
embeddings shared and frozen); per sequence, aux = the target's hidden_states at
`head.cfg.aux` concatenated lowest first, `unroll(head, aux, ids, positions, steps)` gives the draft
logits of depths 1..steps at every entry in one pass per depth (the inputs and masks drafting uses);
the loss at depth j + 1, entry p compares them with the target's distribution of token p + 2 + j
restricted to the draft vocabulary; `save_mmspec_head` writes a directory `--drafter` loads and
`export-eagle3` turns into a clean head for vLLM / SGLang.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmspec import device_tree
from mmspec.drafters.base import DraftContext, Drafter
from mmspec.drafters.feature.files import FORMAT as FEATURE_FORMAT
from mmspec.drafters.feature.files import is_retired, retired_message, target_fingerprint
from mmspec.drafters.feature.net import (RMSNorm, RopeTable, add_linear, apply_rope, attend, rope_cos_sin,
                                         rope_of_angles, text_config)
from mmspec.errors import InputError
from mmspec.graphs import BufferPool, DeviceNoise, GraphTable
from mmspec.kvcache import to_device
from mmspec.tree import TreePool, TreeSpec, tree_attention
from mmspec.verify import Sampling, draft_probs

ARCH = "LlamaForCausalLMEagle3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "mmspec_drafter.json"  # present in heads trained by mmspec (training record, target fingerprint)
MARKER = "mmspec-eagle3-head"
MARKER_VERSION = 1
# Config switches of newer heads this module does not implement; each would change the forward.
UNSUPPORTED = ("norm_before_fc", "fc_norm", "norm_output", "attention_bias", "mlp_bias")


@dataclass(frozen=True)
class HeadConfig:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    rope_theta: float
    vocab: int  # the target's vocabulary
    draft_vocab: int
    target_hidden: int
    aux: tuple[int, ...]  # HF hidden_states indices, ascending = the order fc reads them
    aux_source: str  # where the ids came from, in words (for the app)
    engines_read: tuple = ()  # (("vLLM", ids), ("SGLang", ids)): what each engine would feed this head
    norm_before_residual: bool = False
    act: str = "silu"
    logit_scale: float = 1.0
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False  # Qwen3-VL's layout (t, h, w frequencies interleaved) vs Qwen2-VL's (in blocks)
    own_embed: bool = False
    max_positions: int = 8192  # written back to config.json: the engines bound the draft's context by it


# ------------------------------------------------------------------------------------------------
# config.json -> HeadConfig


def aux_indices(raw: dict, n_layers: int) -> tuple[tuple[int, ...], str]:
    """HF hidden_states indices of the aux layers and a note on which convention gave them."""
    top = raw.get("eagle_aux_hidden_state_layer_ids")
    ec = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if top is not None and ec is not None and sorted(int(i) for i in top) != sorted(int(i) + 1 for i in ec):
        raise InputError(f"config.json gives the aux layers two ways that disagree: top-level {list(top)} (vLLM reads "
                         f"these as they are) vs eagle_config {list(ec)} (SGLang adds one: {[int(i) + 1 for i in ec]})")
    if top is not None:
        ids, note = [int(i) for i in top], "top-level eagle_aux_hidden_state_layer_ids (vLLM: as given)"
    elif ec is not None:
        ids, note = [int(i) + 1 for i in ec], "eagle_config.eagle_aux_hidden_state_layer_ids + 1 (SGLang/SpecForge)"
    else:
        ids, note = [2, n_layers // 2, n_layers - 3], "default (2, L//2, L-3)"
    if len(ids) != 3 or len(set(ids)) != 3:
        raise InputError(f"an EAGLE-3 head reads three distinct target layers; its config gives {ids} ({note})")
    bad = [i for i in ids if not 0 <= i < n_layers]
    if bad:
        raise InputError(f"aux layer {bad[0]} ({note}) is outside this target's layers 0..{n_layers - 1}")
    return tuple(sorted(ids)), note


def _rope(raw: dict) -> tuple[float, tuple[int, ...] | None, bool]:
    """(rope_theta, mrope_section or None, interleaved); other RoPE scalings are refused, not approximated."""
    rs = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    theta = float(raw.get("rope_theta") or rs.get("rope_theta") or 10000.0)
    kind = rs.get("rope_type", rs.get("type", "default"))
    if "mrope_section" in rs or kind == "mrope":
        return theta, tuple(int(s) for s in rs.get("mrope_section", ())), bool(rs.get("mrope_interleaved", False))
    if kind not in (None, "default"):
        raise InputError(f"the head's RoPE scaling {kind!r} is not supported (only default and mrope)")
    return theta, None, False


def _refuse_options(raw: dict) -> None:
    ec = raw.get("eagle_config") or {}
    on = [k for k in UNSUPPORTED if raw.get(k) or ec.get(k)]
    if on:
        raise InputError(f"this head sets {on[0]}, which mmspec's EAGLE-3 forward does not implement")
    if int(raw.get("num_hidden_layers", 1)) != 1:
        raise InputError(f"this head has {raw.get('num_hidden_layers')} decoder layers; mmspec reads one-layer heads")
    if ec.get("use_aux_hidden_state") is False:
        raise InputError("this head reads the last layer only (use_aux_hidden_state false): not an EAGLE-3 fusion head")


def engines_read(raw: dict, n_layers: int) -> tuple:
    """The hidden_states indices each engine would feed this head, from its own reading of the config:
    a head trained with one convention and served by the other engine reads other layers."""
    default = sorted({2, n_layers // 2, n_layers - 3})
    top = raw.get("eagle_aux_hidden_state_layer_ids")
    ec = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    vllm = sorted(int(i) for i in top) if top is not None else default
    sglang = sorted(int(i) + 1 for i in ec) if ec is not None else default
    return (("vLLM", tuple(vllm)), ("SGLang", tuple(sglang)))


def parse_config(raw: dict, target_model, own_embed: bool) -> HeadConfig:
    if ARCH not in (raw.get("architectures") or []):
        raise InputError(f"config.json's architectures {raw.get('architectures')} do not name {ARCH}")
    _refuse_options(raw)
    tc = text_config(target_model)
    try:
        H, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        theta, mrope, interleaved = _rope(raw)
        aux, note = aux_indices(raw, tc.num_hidden_layers)
        cfg = HeadConfig(
            hidden=H, heads=heads, kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or H // heads), intermediate=int(raw["intermediate_size"]),
            eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta, vocab=int(raw["vocab_size"]),
            draft_vocab=int(raw.get("draft_vocab_size") or raw["vocab_size"]),
            target_hidden=int(raw.get("target_hidden_size") or H), aux=aux, aux_source=note,
            engines_read=engines_read(raw, tc.num_hidden_layers),
            norm_before_residual=bool(raw.get("norm_before_residual", False)), act=str(raw.get("hidden_act", "silu")),
            logit_scale=float(raw.get("logit_scale", 1.0)), mrope_section=mrope, mrope_interleaved=interleaved,
            own_embed=own_embed, max_positions=int(raw.get("max_position_embeddings") or 8192),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"config.json lacks or garbles a Llama field: {e}") from e
    _check_target(cfg, tc)
    return cfg


def _check_target(cfg: HeadConfig, tc) -> None:
    if cfg.target_hidden != tc.hidden_size:
        raise InputError(f"the head reads target hidden states of width {cfg.target_hidden}; "
                         f"this target's are {tc.hidden_size}")
    if cfg.vocab != tc.vocab_size:
        raise InputError(f"the head's vocab_size {cfg.vocab} is not this target's {tc.vocab_size}")
    if not cfg.own_embed and cfg.hidden != tc.hidden_size:
        raise InputError(f"the head (hidden {cfg.hidden}) has no embed_tokens and cannot share the target's "
                         f"{tc.hidden_size}-wide embeddings")
    if cfg.mrope_section is not None and 2 * sum(cfg.mrope_section) != cfg.head_dim:
        raise InputError(f"mrope_section {list(cfg.mrope_section)} does not cover head_dim {cfg.head_dim}")
    if cfg.act not in ACTS:
        raise InputError(f"hidden_act {cfg.act!r} is not supported")


def expected_shapes(cfg: HeadConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the format's safetensors file, with its shape (t2d included, as SpecForge writes it)."""
    H, I, d = cfg.hidden, cfg.intermediate, cfg.head_dim
    s = {
        "fc.weight": (H, 3 * cfg.target_hidden),
        "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (cfg.heads * d, 2 * H),
        "midlayer.self_attn.k_proj.weight": (cfg.kv_heads * d, 2 * H),
        "midlayer.self_attn.v_proj.weight": (cfg.kv_heads * d, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, cfg.heads * d),
        "midlayer.mlp.gate_proj.weight": (I, H), "midlayer.mlp.up_proj.weight": (I, H),
        "midlayer.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,), "lm_head.weight": (cfg.draft_vocab, H), "d2t": (cfg.draft_vocab,), "t2d": (cfg.vocab,),
    }
    if cfg.own_embed:
        s["embed_tokens.weight"] = (cfg.vocab, H)
    return s


def check_tensors(state: dict[str, torch.Tensor], cfg: HeadConfig) -> None:
    """Names, shapes and the vocabulary map, completing what the engines let a head omit: t2d (never
    read) and, for a full-vocabulary head, d2t (vLLM then maps draft id i to target id i)."""
    if "d2t" not in state and cfg.draft_vocab == cfg.vocab:
        state["d2t"] = torch.zeros(cfg.vocab, dtype=torch.long)
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in state and k != "t2d"]
    extra = [k for k in state if k not in want]
    if missing or extra:
        raise InputError(f"the head's tensors do not match its config: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, shape in want.items():
        if k in state and tuple(state[k].shape) != shape:
            raise InputError(f"tensor {k} has shape {list(state[k].shape)}; the config implies {list(shape)}")
    d2t = state["d2t"]
    if d2t.dtype not in (torch.int64, torch.int32):
        raise InputError(f"d2t must hold integers, not {d2t.dtype}")
    ids = torch.arange(cfg.draft_vocab) + d2t.long()
    if bool((ids < 0).any() or (ids >= cfg.vocab).any()) or len(set(ids.tolist())) != cfg.draft_vocab:
        raise InputError("d2t maps draft ids outside the target vocabulary or two draft ids to one target id")
    state.setdefault("t2d", _t2d(d2t, cfg))


# ------------------------------------------------------------------------------------------------
# The network (parameter names are the format's tensor names)


ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def mrope_axes(section: tuple[int, ...], interleaved: bool) -> torch.Tensor:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each of the head_dim / 2 rotary frequencies:
    Qwen2-VL takes consecutive blocks of `section` sizes; Qwen3-VL interleaves t, h, w, each of h and
    w covering the first 3 * section[axis] frequencies."""
    if not interleaved:
        return torch.repeat_interleave(torch.arange(3), torch.tensor(section))
    j = torch.arange(sum(section))
    axes = torch.zeros_like(j)
    for a in (1, 2):
        axes[(j % 3 == a) & (j < 3 * section[a])] = a
    return axes


class _Attention(nn.Module):
    def __init__(self, c: HeadConfig):
        super().__init__()
        d = c.head_dim
        self.q_proj = nn.Linear(2 * c.hidden, c.heads * d, bias=False)  # q/k/v read [emb, hidden]: 2H wide
        self.k_proj = nn.Linear(2 * c.hidden, c.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden, c.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(c.heads * d, c.hidden, bias=False)
        self.shape = (c.heads, c.kv_heads, d)

    def project(self, a_in, cos, sin):
        """a_in [B, T, 2H] -> rotated q [B, h, T, d] and this entry's k, v [B, kv, T, d]."""
        h, kv, d = self.shape
        B, T, _ = a_in.shape
        split = lambda x, n: x.view(B, T, n, d).transpose(1, 2)  # noqa: E731
        q, k = split(self.q_proj(a_in), h), split(self.k_proj(a_in), kv)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), split(self.v_proj(a_in), kv)


class _MLP(nn.Module):
    def __init__(self, c: HeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)
        self.act = ACTS[c.act]

    def inner(self, x):
        """The activations down_proj reads."""
        return self.act(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x):
        return self.down_proj(self.inner(x))


class _Midlayer(nn.Module):
    def __init__(self, c: HeadConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.eps)
        self.hidden_norm = RMSNorm(c.hidden, c.eps)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps)
        self.self_attn = _Attention(c)
        self.mlp = _MLP(c)


class Eagle3Head(nn.Module):
    """The format's network. The pieces a trainer needs: `embed`, `first_hidden` (fc over the aux
    features), `rope`, `step` (one layer pass over entries, with a KV past and any mask: training-
    time-test unrolls call it once per unroll step) and `logits` / `target_logits`."""

    def __init__(self, cfg: HeadConfig, target_embed: nn.Module | None = None):
        super().__init__()
        c = self.cfg = cfg
        self.fc = nn.Linear(3 * c.target_hidden, c.hidden, bias=False)
        self.midlayer = _Midlayer(c)
        self.norm = RMSNorm(c.hidden, c.eps)
        self.lm_head = nn.Linear(c.hidden, c.draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab, dtype=torch.bool))
        if c.own_embed:
            self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        else:  # the target's, held by reference: never saved, never trained
            object.__setattr__(self, "shared_embed", target_embed)
        if c.mrope_section is not None:  # on the head's device: a host copy per step would break graph capture
            self.register_buffer("rope_axes", mrope_axes(c.mrope_section, c.mrope_interleaved), persistent=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.own_embed:
            return self.embed_tokens(ids.to(self.fc.weight.device))
        table = self.shared_embed  # detached: training the head never moves the target's embeddings
        return table(ids.to(table.weight.device)).detach().to(self.fc.weight.device, self.fc.weight.dtype)

    def first_hidden(self, aux: torch.Tensor) -> torch.Tensor:
        """aux [.., 3*Ht]: the aux layers' hidden states concatenated lowest layer first -> [.., H]."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def rope(self, positions: torch.Tensor):
        """positions [T] (1-D) or [3, T] (M-RoPE), or either with a leading batch dim ([B, T], [B, 3, T])
        -> cos, sin [B or 1, 1, T, d]."""
        c = self.cfg
        T = positions.shape[-1]
        if c.mrope_section is None:
            return rope_cos_sin(positions.reshape(-1, T), c.head_dim, c.rope_theta)
        half = torch.arange(0, c.head_dim, 2, device=positions.device, dtype=torch.float32)
        inv = 1.0 / (c.rope_theta ** (half / c.head_dim))
        axes = self.rope_axes.to(positions.device)
        f = positions.reshape(-1, 3, T).float()[:, axes].transpose(1, 2) * inv  # [B, T, d/2]
        return rope_of_angles(torch.cat((f, f), -1)[:, None])

    def step(self, hidden_in, token_emb, rope, mask, past=None):
        """One pass of the midlayer over new entries.

        hidden_in, token_emb [B, T, H]; rope = self.rope(positions); mask [B, T, S + T] bool (True =
        attend) over past then new entries; past = (K, V) [B, kv, S, d] or None.
        Returns the pre-norm hidden x [B, T, H] (what the next step feeds back), the draft-vocabulary
        logits [B, T, Vd] and the new entries' (k, v)."""
        x, kv = self.layer(hidden_in, token_emb, rope, mask, past)
        return x, self.logits(x), kv

    def layer(self, hidden_in, token_emb, rope, mask, past=None, write_rows=None):
        """`step` without the logits. With write_rows [T] (drafting's preallocated cache) past holds
        whole buffers [B, kv, cap, d]: the new entries' k, v are written at those rows and mask
        [B, T, cap] says which rows each entry sees."""
        m = self.midlayer
        h = m.hidden_norm(hidden_in)
        residual = h if self.cfg.norm_before_residual else hidden_in
        a_in = torch.cat([m.input_layernorm(token_emb), h], -1)
        q, k, v = m.self_attn.project(a_in, *rope)
        if write_rows is not None:
            K, V = past[0].index_copy_(2, write_rows, k), past[1].index_copy_(2, write_rows, v)
        else:
            K, V = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        x = add_linear(residual, attend(q, K, V, mask), m.self_attn.o_proj)
        return add_linear(x, m.mlp.inner(m.post_attention_layernorm(x)), m.mlp.down_proj), (k, v)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(self.norm(x))
        return out if self.cfg.logit_scale == 1.0 else out * self.cfg.logit_scale

    def target_ids(self) -> torch.Tensor:
        return torch.arange(self.cfg.draft_vocab, device=self.d2t.device) + self.d2t

    def full_vocab(self) -> bool:
        """Draft id i is target id i for every i (no scatter needed; one host read, call it once)."""
        return self.cfg.draft_vocab == self.cfg.vocab and not bool(self.d2t.any())

    def target_logits(self, logits: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Draft-vocabulary logits [.., Vd] -> target-vocabulary logits [.., V], -inf off the draft
        vocabulary. ids: `target_ids()` computed once by the caller (drafting), else here."""
        ids = (self.target_ids() if ids is None else ids).expand(*logits.shape[:-1], -1)
        # a scatter: no host sync inside a CUDA graph
        return logits.new_full((*logits.shape[:-1], self.cfg.vocab), float("-inf")).scatter(-1, ids, logits)


def unroll(head: Eagle3Head, aux: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, steps: int):
    """Training-time test (EAGLE-3) over one sequence, teacher-forced: the draft logits the head gives
    at every entry p for depths 1..steps along the true continuation, in one pass per depth.

    aux [n, 3*Ht]: the aux features of target positions 0..n-1; tokens [n + steps]: the sequence's ids
    (pad past its end; those rows carry no loss); positions [n] or [3, n]: entry p's RoPE position.
    Depth j + 1 at entry p feeds token p + 1 + j with the pre-norm state of depth j at p, at position
    p + j, attending to entries 0..p and to its own chain (the diagonal of every earlier depth) - the
    very inputs and mask a tree node has at inference. Returns [steps] of logits [n, Vd]."""
    return [x[0] for x in unroll_batch(head, aux[None], tokens[None], positions[None], steps)]


def unroll_batch(head: Eagle3Head, aux: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, steps: int):
    """`unroll` over a batch of right-padded sequences: aux [B, n, 3*Ht], tokens [B, n + steps],
    positions [B, n] or [B, 3, n]. Returns [steps] of logits [B, n, Vd]; row b, entry p equals the
    single-sequence pass over sequence b for every p below its length.

    Right padding needs no key-padding mask: an entry attends to entries at or before it (and its own
    chain), so a real entry never sees a pad; pad rows compute garbage that the loss masks out."""
    B, n = aux.shape[:2]
    dev = head.fc.weight.device
    hidden = head.first_hidden(aux.to(dev))
    eye = torch.eye(n, dtype=torch.bool, device=dev).expand(B, n, n)
    mask = torch.ones(n, n, dtype=torch.bool, device=dev).tril().expand(B, n, n)
    positions, tokens = positions.to(dev), tokens.to(dev)
    past, out = None, []
    for j in range(steps):
        emb = head.embed(tokens[:, 1 + j : 1 + j + n])
        x, logits, (k, v) = head.step(hidden, emb, head.rope(positions + j), mask, past)
        out.append(logits)
        past = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        mask = torch.cat([mask, eye], 2)  # the next depth sees this one on the diagonal only
        hidden = x
    return out


# ------------------------------------------------------------------------------------------------
# The engine-facing drafter


class _Buffers:
    """Preallocated state of one head, leased per head and reused by later requests (CUDA graphs
    captured over it hold these addresses): the midlayer's KV rows (row p = committed entry p, then
    a step's draft nodes), fc(aux) of every committed target position, and the root: the last
    committed entry's pre-norm x and RoPE position ([axes, 1]). Rows past what a request wrote are
    stale and masked out."""

    def __init__(self, head: Eagle3Head, cap: int, device: torch.device, dtype: torch.dtype):
        c = head.cfg
        self.cap, self.device, self.dtype = cap, device, dtype
        z = lambda *shape: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        self.k, self.v = z(1, c.kv_heads, cap, c.head_dim), z(1, c.kv_heads, cap, c.head_dim)
        self.feats = z(cap, c.hidden)
        self.cols = torch.arange(cap, device=device)
        self.root = z(c.hidden)
        self.root_pos = torch.zeros(_axes(c), 1, dtype=torch.long, device=device)
        # 1-D heads look RoPE rows up: positions are sequence indices, below the rows reserved (cap).
        self.rope = RopeTable(2 * cap, c.head_dim, c.rope_theta, device, dtype) if c.mrope_section is None else None
        # Draft ids to target ids (None: the identity, no scatter). Here, not per request: a captured
        # graph reads it at this address for as long as the buffers live.
        self.ids = None if head.full_vocab() else head.target_ids().to(device)
        self.graphs = GraphTable(device)

    def copy_from(self, old: "_Buffers") -> None:
        """Take over what `old` (smaller) holds: the eager path grows its buffers this way."""
        n = old.cap
        self.k[:, :, :n], self.v[:, :, :n] = old.k, old.v
        self.feats[:n] = old.feats
        self.root.copy_(old.root)
        self.root_pos.copy_(old.root_pos)


def _axes(c: HeadConfig) -> int:
    """Rows of a position tensor: 3 for an M-RoPE head (t, h, w), else 1."""
    return 1 if c.mrope_section is None else 3


_BUFFERS = BufferPool(_Buffers)


@dataclass
class _Request:
    """What one prompt's drafting holds (host side; tensors live in `_Buffers`). Entry p pairs
    fc(aux[p]) with token p + 1 and sits at cache row p."""

    ids: list[int]  # prompt ids
    prompt_pos: torch.Tensor  # [P] or [3, P] the prompt's RoPE positions (head's device)
    rope_offset: int  # added to indices after the prompt (M-RoPE heads; 0 for 1-D ones)
    fast_path: bool  # the engine's static-cache path: buffers sized once from its room
    graphed: bool  # ... and the step bodies replayed from CUDA graphs
    n_feat: int  # target positions with features
    n_cache: int = 0  # committed entries (KV rows)
    forwards: int = 0  # head forwards this step


class Eagle3HeadDrafter(Drafter):
    """Chains and dynamic trees are drafted by one body per step on the device (feed the entries
    committed since the last step, then draft; `_step_body`, `_tree_body`), replayed from CUDA
    graphs on the engine's fast path on a GPU and run eagerly elsewhere; static trees are grown
    by `tree.grow_tree` over the same buffers."""

    kind = "eagle3"

    def __init__(self, head: Eagle3Head, target, name: str, meta: dict | None = None):
        self.head = head
        self.target = target
        self.name = name
        self.meta = dict(meta or {})
        self.cfg = head.cfg
        self.target_layers = head.cfg.aux
        self.req: _Request | None = None
        self.buf: _Buffers | None = None
        self._noise = DeviceNoise()

    def info(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "name": self.name, "kind": self.kind, "target_layers": list(c.aux), "aux_layers_from": c.aux_source,
            "engines_would_read": {e: list(ids) for e, ids in c.engines_read},
            "draft_vocab": c.draft_vocab, "vocab": c.vocab, "own_embed_tokens": c.own_embed,
            "mrope_section": list(c.mrope_section) if c.mrope_section else None,
            "norm_before_residual": c.norm_before_residual, "trained": self.meta.get("trained", True),
            "params": sum(p.numel() for p in self.head.parameters()),
        }

    @property
    def _dev(self) -> torch.device:
        return self.head.fc.weight.device

    @property
    def _dt(self) -> torch.dtype:
        return self.head.fc.weight.dtype

    # --- per prompt ---------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, ctx: DraftContext) -> None:
        self.finish()
        P = len(ctx.prompt_ids)
        # The fast path's room bounds every row a request writes; eagerly the buffers grow instead.
        fast = ctx.cache_room is not None
        self.buf = _BUFFERS.lease(self.head, P + (ctx.cache_room if fast else 256), self._dev, self._dt)
        self.buf.feats[:P] = self._fc(ctx.target_hidden)  # rows in target_layers order = ascending = fc's order
        mrope = self.cfg.mrope_section is not None
        offset = ctx.target_cache.rope_offset if mrope and ctx.target_cache is not None else 0
        graphed = fast and ctx.cuda_graphs and self._dev.type == "cuda"
        self.req = _Request(list(ctx.prompt_ids), self._prompt_positions(ctx), offset, fast, graphed, P)
        self._noise.reset()

    def finish(self) -> None:
        _BUFFERS.give_back(self.head, self.buf)
        self.buf, self.req = None, None

    def _fc(self, aux: torch.Tensor) -> torch.Tensor:
        """Aux features [3, k, Ht] -> the head's hidden_in rows [k, H]."""
        return self.head.first_hidden(aux.to(self._dev).permute(1, 0, 2).reshape(aux.shape[1], -1))

    def _prompt_positions(self, ctx: DraftContext) -> torch.Tensor:
        P = len(ctx.prompt_ids)
        seq = torch.arange(P, device=self._dev)
        if self.cfg.mrope_section is None:
            return seq
        pos = None
        if ctx.target_inputs is not None:
            from mmspec.model import execution_device

            dev = execution_device(ctx.target.model)
            inputs = {k: v.to(dev) for k, v in ctx.target_inputs.items()}
            pos = ctx.target.family.prefill_position_ids(ctx.target.model, inputs)
        return seq.expand(3, P) if pos is None else pos[:, 0].to(self._dev)

    def _positions(self, lo: int, hi: int) -> torch.Tensor:
        """RoPE positions [T] or [3, T] of target positions lo..hi-1: the prompt's own, then index (+ M-RoPE delta)."""
        r = self.req
        if self.cfg.mrope_section is None:
            return torch.arange(lo, hi, device=self._dev)
        later = torch.arange(max(lo, len(r.ids)), hi, device=self._dev)
        return torch.cat([r.prompt_pos[:, lo:hi], (later + r.rope_offset).expand(3, -1)], -1)

    @torch.no_grad()
    def observe(self, target_hidden: torch.Tensor, tokens: list[int]) -> None:
        r, k = self.req, target_hidden.shape[1]
        self._reserve(r.n_feat + k)
        self.buf.feats[r.n_feat : r.n_feat + k] = self._fc(target_hidden)
        r.n_feat += k

    def _reserve(self, rows: int) -> None:
        """Room for `rows` entries (on the fast path the engine's room makes growing rare)."""
        self.buf = _BUFFERS.grown(self.head, self.buf, rows)

    # --- the head over the buffers ----------------------------------------------------------------
    def _forward(self, hidden_in, tokens, pos, rows, allowed=None) -> torch.Tensor:
        """Entries (hidden_in [T, H], tokens [T]) at RoPE positions pos [axes, T], written at cache
        rows [T] (device tensors). allowed [T, cap]: the rows each entry sees (default: every row up
        to its own). Returns their pre-norm x [T, H]."""
        head, buf = self.head, self.buf
        if allowed is None:
            allowed = buf.cols[None, :] <= rows[:, None]
        emb = head.embed(tokens)[None]
        rope = buf.rope(pos) if buf.rope is not None else head.rope(pos)
        x, _ = head.layer(hidden_in[None], emb, rope, allowed[None], (buf.k, buf.v), rows)
        return x[0]

    def _probs(self, x: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        """q over the target vocabulary after pre-norm states x [T, H] (0 off the draft vocabulary)."""
        logits = self.head.logits(x).float()
        if self.buf.ids is not None:
            logits = self.head.target_logits(logits, self.buf.ids)
        return draft_probs(logits, sampling)

    def _set_root(self, x: torch.Tensor, pos: torch.Tensor) -> None:
        self.buf.root.copy_(x[-1])
        self.buf.root_pos.copy_(pos[:, -1:])

    # --- the prompt (eager, once per request) -----------------------------------------------------
    def _feed_prompt(self, seq: list[int], upto: int) -> None:
        """Entries 0..upto in one forward, attending over their own rows only (not the whole buffer)."""
        buf, n, dev = self.buf, upto + 1, self._dev
        pos = self._positions(0, n).view(_axes(self.cfg), n)
        rows = torch.arange(n, device=dev)
        head = self.head
        x, _ = head.layer(buf.feats[None, :n], head.embed(torch.tensor(seq[1 : n + 1], device=dev))[None],
                          head.rope(pos), (rows[None, :] <= rows[:, None])[None],
                          (buf.k[:, :, :n], buf.v[:, :, :n]), rows)
        self._set_root(x[0], pos)
        self.req.n_cache = n
        self.req.forwards += 1

    # --- one step: feed what was accepted, then draft --------------------------------------------
    def _feed_accepted(self, k: int, ints) -> None:
        """The k entries committed since the last step, from ints = [first cache row, its RoPE
        position, the k tokens]; the last one becomes the root."""
        if not k:
            return
        steps = torch.arange(k, device=ints.device)
        rows = ints[0] + steps
        pos = (ints[1] + steps).expand(_axes(self.cfg), k)  # after the prompt: index + delta on every axis
        self._set_root(self._forward(self.buf.feats.index_select(0, rows), ints[2 : 2 + k], pos, rows), pos)

    def _step_body(self, k: int, depth: int, sampling: Sampling, ints, noise):
        """Feed the accepted entries, then draft a chain of `depth` tokens from the new root, all on
        the device (one CUDA graph per (k, depth, sampling) on a GPU). Returns the chain's tokens
        [depth], their q [depth] and q rows [depth, V] (nothing when depth is 0)."""
        self._feed_accepted(k, ints)
        return self._chain(ints[0] + k, depth, sampling, noise) if depth else None

    def _chain(self, row, depth: int, sampling: Sampling, noise):
        """`depth` tokens after the root: the node at depth d + 1 is fed at cache row row + d, at the
        root's position + d + 1, with the pre-norm x that predicted it."""
        buf = self.buf
        x, toks, probs, rows = buf.root[None], [], [], []
        # index arithmetic once per body, slices per forward (each tensor op is a kernel on the device)
        steps = torch.arange(max(depth, 1), device=buf.root.device)
        node_pos, node_row = buf.root_pos + 1 + steps, row + steps
        for d in range(depth):
            q = self._probs(x, sampling)[0]
            token, q_token = device_tree.draw(q, None if noise is None else noise[d])
            toks.append(token)
            probs.append(q_token)
            rows.append(q)
            if d + 1 < depth:
                x = self._forward(x, token, node_pos[:, d : d + 1], node_row[d : d + 1])
        return torch.cat(toks), torch.cat(probs), torch.stack(rows)

    def _tree_body(self, k: int, spec: TreeSpec, sampling: Sampling, ints, noise) -> device_tree.DeviceTree:
        """Feed the accepted entries, then grow an EAGLE-2 dynamic tree on the device: a node is fed
        with its parent's pre-norm x at the root's position + its depth."""
        self._feed_accepted(k, ints)
        buf = self.buf

        def expand(depth, tokens, feeds, rows, allowed):
            x = self._forward(feeds, tokens, (buf.root_pos + depth).expand(-1, rows.shape[0]), rows, allowed)
            return self._probs(x, sampling), x

        root_q = self._probs(buf.root[None], sampling)[0]
        return device_tree.grow(expand, root_q, buf.root, spec, ints[0] + k, buf.cols, noise)

    def _run_step(self, new_tokens: list[int], spec: TreeSpec, sampling: Sampling, gen):
        """Feed the accepted tokens and draft `spec` (a chain, a dynamic tree, or nothing: kind
        "none") in one body on the device, replayed from a CUDA graph per shape on a GPU."""
        req, dev, k = self.req, self._dev, len(new_tokens)
        self._reserve(req.n_cache + device_tree.step_rows(spec, k))
        ints = to_device(torch.tensor([req.n_cache, req.n_cache + req.rope_offset, *new_tokens], dtype=torch.long), dev)
        noise = self._noise.for_draft(spec, sampling, self.cfg.vocab, dev, gen)
        out = device_tree.run_step(self.buf.graphs, req.graphed, (), k, spec, sampling, ints, noise,
                                   self._step_body, self._tree_body)
        req.n_cache += k
        req.forwards += (1 if k else 0) + max(spec.depth - 1, 0)
        return out

    @torch.no_grad()
    def propose(self, committed, spec, sampling, gen):
        req = self.req
        seq, upto = device_tree.pending(req.ids, committed, req.n_feat, "EAGLE-3 drafter")
        req.forwards = 0
        if req.n_cache == 0:
            self._feed_prompt(seq, upto)
        new = seq[req.n_cache + 1 : upto + 2]  # token p + 1 of each entry p not yet fed
        # Chains and dynamic trees on the device on both paths: eagerly the same bodies run unrecorded.
        prop = device_tree.propose(self._run_step, self._tree_expander, new, spec, sampling, gen, on_device=True)
        prop.extras = {"drafter_forwards": req.forwards}
        return prop

    def _tree_expander(self, sampling: Sampling):
        """grow_tree's expand over the buffers (static trees): nodes are fed after the committed rows
        in the order they are expanded, each seeing the committed rows and its ancestors (rows past
        the committed ones are never kept)."""
        xs: dict[int, torch.Tensor] = {-1: self.buf.root.clone()}
        root_pos, fed = self.buf.root_pos.clone(), []

        def expand(pool: TreePool, ids: list[int]) -> torch.Tensor:
            if ids != [-1]:
                x = self._feed_nodes(pool, ids, fed, [xs[pool.parents[i]] for i in ids], root_pos)
                xs.update(zip(ids, x))
                fed.extend(ids)
            return self._probs(torch.stack([xs[i] for i in ids]), sampling)

        return expand

    def _feed_nodes(self, pool: TreePool, ids: list[int], fed: list[int], parent_x, root_pos) -> torch.Tensor:
        """Nodes `ids` (fed after the committed rows and the nodes `fed` before them) -> their x."""
        req, dev = self.req, self._dev
        start, T = req.n_cache + len(fed), len(ids)
        self._reserve(start + T)
        anc = tree_attention(pool.parents)[1:, 1:]
        allowed = torch.zeros(T, self.buf.cap, dtype=torch.bool)
        allowed[:, : req.n_cache] = True
        allowed[:, req.n_cache : start + T] = anc[torch.tensor(ids)][:, torch.tensor(fed + ids)]
        depth = torch.tensor([pool.depths[i] for i in ids], device=dev)
        tokens = torch.tensor([pool.tokens[i] for i in ids], device=dev)
        req.forwards += 1
        rows = torch.arange(start, start + T, device=dev)
        return self._forward(torch.stack(parent_x), tokens, root_pos + depth, rows, allowed.to(dev))


# ------------------------------------------------------------------------------------------------
# Directories: recognise, load, save (mmspec-trained), export


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_eagle3_head(path) -> bool:
    """A directory whose config.json names the EAGLE-3 architecture (or an mmspec-trained head)."""
    try:
        p = Path(path)
        if not p.is_dir():
            return False
    except (OSError, TypeError):
        return False
    cfg, meta = _read_json(p / CONFIG_FILE) or {}, _read_json(p / META_FILE) or {}
    return ARCH in (cfg.get("architectures") or []) or meta.get("format") == MARKER


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))  # the original EAGLE-3 heads
    if not files:
        raise InputError(f"{path} has no model.safetensors (or pytorch_model.bin) weights")
    state: dict[str, torch.Tensor] = {}
    try:
        for f in files:  # weights_only: a .bin is a pickle, and a head directory may come from anywhere
            binary = f.suffix != ".safetensors"
            state.update(torch.load(f, map_location="cpu", weights_only=True) if binary else load_file(str(f)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise InputError(f"cannot read the head's weights in {path}: {str(e).splitlines()[0][:200]}") from e
    # Some trainers save the midlayer under `model.`; the engines' loaders expect bare names.
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_eagle3_head(path, target, name: str | None = None) -> Eagle3HeadDrafter:
    """An EAGLE-3 head directory -> a drafter for `target`; anything that does not fit is an InputError."""
    path = Path(path)
    raw = _read_json(path / CONFIG_FILE)
    if raw is None:
        raise InputError(f"{path} has no readable {CONFIG_FILE}")
    meta = _read_json(path / META_FILE) or {}
    _check_fingerprint(path, meta, target)
    state = _read_weights(path)
    cfg = parse_config(raw, target.model, own_embed="embed_tokens.weight" in state)
    check_tensors(state, cfg)
    head = Eagle3Head(cfg, target.model.get_input_embeddings())
    head.load_state_dict(state, strict=True)
    from mmspec.model import last_layer_device

    head = head.to(last_layer_device(target.model), target.dtype).eval()
    return Eagle3HeadDrafter(head, target, name or meta.get("name") or path.name, meta)


def _check_fingerprint(path: Path, meta: dict, target) -> None:
    want = meta.get("target")
    if meta.get("format") != MARKER or not want:
        return
    have = target_fingerprint(target.model)
    diff = [k for k in have if want.get(k) != have[k]]
    if diff:
        raise InputError(f"EAGLE-3 head {path} was trained for another target ({diff[0]}: {want.get(diff[0])!r}, "
                         f"this target: {have[diff[0]]!r})")


def _t2d(d2t: torch.Tensor, cfg: HeadConfig) -> torch.Tensor:
    t2d = torch.zeros(cfg.vocab, dtype=torch.bool)
    t2d[torch.arange(cfg.draft_vocab) + d2t.long().cpu()] = True
    return t2d


def vocab_map(target_ids: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft vocabulary (target ids, e.g. the most frequent in the training data) -> (d2t, t2d).
    Draft ids follow ascending target ids, as SpecForge builds them."""
    ids = torch.tensor(sorted(set(int(t) for t in target_ids)), dtype=torch.long)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(len(ids)), t2d


def head_config_json(cfg: HeadConfig, dtype: torch.dtype, extra: dict | None = None) -> dict:
    """The config.json vLLM, SGLang and SpecForge read. Aux ids are written both ways (top-level as
    hidden_states indices for vLLM, eagle_config minus one for SGLang), so both engines read the same layers."""
    raw = {
        "architectures": [ARCH], "model_type": "llama", "hidden_size": cfg.hidden, "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate,
        "num_hidden_layers": 1, "rms_norm_eps": cfg.eps, "hidden_act": cfg.act, "vocab_size": cfg.vocab,
        "draft_vocab_size": cfg.draft_vocab, "target_hidden_size": cfg.target_hidden, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_positions, "tie_word_embeddings": False, "attention_bias": False,
        "norm_before_residual": cfg.norm_before_residual, "torch_dtype": str(dtype).replace("torch.", ""),
        "eagle_aux_hidden_state_layer_ids": list(cfg.aux),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in cfg.aux], "use_aux_hidden_state": True},
    }
    if cfg.logit_scale != 1.0:
        raw["logit_scale"] = cfg.logit_scale
    # The forms the targets' own configs use (Qwen2.5-VL: legacy type "mrope"; Qwen3-VL: rope_type
    # "default" + mrope_interleaved). Never both keys: vLLM refuses a type that contradicts rope_type.
    if cfg.mrope_section is not None and cfg.mrope_interleaved:
        raw["rope_scaling"] = {"rope_type": "default", "mrope_section": list(cfg.mrope_section), "mrope_interleaved": True}
    elif cfg.mrope_section is not None:
        raw["rope_scaling"] = {"type": "mrope", "mrope_section": list(cfg.mrope_section)}
    return {**raw, **(extra or {})}


def _write_head(head: Eagle3Head, out: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in head.state_dict().items():
        v = v.detach().cpu()
        state[k] = (v if k in ("d2t", "t2d") else v.to(dtype)).contiguous()
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(head_config_json(head.cfg, dtype), indent=2))


def save_mmspec_head(drafter: Eagle3HeadDrafter, path, extra: dict | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> Path:
    """A head trained here: the format's two files plus mmspec_drafter.json (marker, target
    fingerprint, training record). Loadable with --drafter as is; `export-eagle3` strips the record."""
    path = Path(path)
    model = drafter.target.model
    _write_head(drafter.head, path, dtype)
    meta = {**drafter.meta, "format": MARKER, "version": MARKER_VERSION, "name": drafter.name,
            "target": target_fingerprint(model), **(extra or {})}
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def export_eagle3(src, out) -> Path:
    """An mmspec-trained EAGLE-3 head directory -> a clean head directory for vLLM / SGLang.

    No target is loaded: the head is checked against its own config (tensor names, shapes, d2t)."""
    src, out = Path(src), Path(out)
    meta = _read_json(src / META_FILE)
    if meta is None:
        raise InputError(f"{src} is not an mmspec drafter directory (no {META_FILE})")
    if meta.get("format") != MARKER:
        raise InputError(_not_exportable(src, meta))
    raw = _read_json(src / CONFIG_FILE) or {}
    state = _read_weights(src)
    cfg = _standalone_config(raw, own_embed="embed_tokens.weight" in state)
    check_tensors(state, cfg)
    head = Eagle3Head(cfg)
    head.load_state_dict(state, strict=True)
    if out.resolve() == src.resolve():
        raise InputError("OUT_DIR must differ from SRC_DIR")
    _write_head(head, out, state["fc.weight"].dtype)
    return out


def _not_exportable(src: Path, meta: dict) -> str:
    variant = meta.get("variant")
    if meta.get("format") == FEATURE_FORMAT and is_retired(meta):
        return retired_message(src)
    if meta.get("format") == FEATURE_FORMAT:
        return f"{src} is a feature drafter of variant {variant!r}, which has no EAGLE-3 format; only EAGLE-3 heads export"
    return f"{src}/{META_FILE} has format {meta.get('format')!r}, not {MARKER!r}"


class _NoTarget:
    """Stands in for a target when a head is checked against its own config only (export)."""

    def __init__(self, raw: dict, n_layers: int):
        self.hidden_size = int(raw.get("target_hidden_size") or raw.get("hidden_size", 0))
        self.vocab_size = int(raw.get("vocab_size", 0))
        self.num_hidden_layers = n_layers
        self.config = self


def _standalone_config(raw: dict, own_embed: bool) -> HeadConfig:
    top = raw.get("eagle_aux_hidden_state_layer_ids") or [i + 1 for i in (raw.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids", [])]
    n_layers = max(top, default=0) + 1  # any count above the ids: the target is not at hand here
    return parse_config(raw, _NoTarget(raw, n_layers), own_embed)


def create_head(target, aux: tuple[int, ...] | None = None, draft_ids: list[int] | None = None, seed: int = 0,
                name: str = "eagle3-head") -> Eagle3HeadDrafter:
    """A new (untrained) format head sized for `target`, the start of training: lm_head rows copied
    from the target's for the draft vocabulary, norms at one, fc and the midlayer random (seeded)."""
    tc = text_config(target.model)
    L = tc.num_hidden_layers
    raw = head_config_json(_sized(tc, aux or (2, L // 2, L - 3), draft_ids), target.dtype)
    ids = sorted(set(draft_ids)) if draft_ids is not None else list(range(tc.vocab_size))
    d2t, t2d = vocab_map(ids, tc.vocab_size)
    torch.manual_seed(seed)
    head = Eagle3Head(parse_config(raw, target.model, own_embed=False), target.model.get_input_embeddings())
    with torch.no_grad():
        head.d2t.copy_(d2t)
        head.t2d.copy_(t2d)
        head.lm_head.weight.copy_(target.model.get_output_embeddings().weight.detach()[torch.tensor(ids)].cpu())
    from mmspec.model import last_layer_device

    head = head.to(last_layer_device(target.model), target.dtype).eval()
    return Eagle3HeadDrafter(head, target, name, {"trained": False})


def _sized(tc, aux, draft_ids) -> HeadConfig:
    from mmspec.drafters.feature.net import rope_theta

    heads = tc.num_attention_heads
    rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    section = rope.get("mrope_section")
    return HeadConfig(
        hidden=tc.hidden_size, heads=heads, kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads, intermediate=tc.intermediate_size,
        eps=float(getattr(tc, "rms_norm_eps", 1e-6)), rope_theta=rope_theta(tc), vocab=tc.vocab_size,
        draft_vocab=len(set(draft_ids)) if draft_ids is not None else tc.vocab_size, target_hidden=tc.hidden_size,
        aux=tuple(sorted(aux)), aux_source="mmspec", mrope_section=tuple(section) if section else None,
        mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
        max_positions=int(getattr(tc, "max_position_embeddings", None) or 8192),
    )
