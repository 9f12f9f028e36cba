"""The feature drafter's network: FeatConfig (the switches), the published recipes (`VARIANTS`),
`make_config` (a config sized for a target), FeatNet with its layers (attention, MLP, DREAM's cross
block, ViSpec/FLASH's adaptor, FLASH's future heads) and the RoPE / RMSNorm / attention helpers
(EAGLE-3 heads in `mmspec.drafters.eagle3_head` reuse them). Shared by training and inference."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.errors import InputError


@dataclass
class FeatConfig:
    variant: str = "eagle"
    # copied from the target's text config
    hidden: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    intermediate: int = 0
    eps: float = 1e-6
    rope_theta: float = 10000.0
    target_layers_n: int = 0  # decoder layers of the target (L)
    vocab: int = 0
    # architecture options
    n_layers: int = 1
    dream: bool = False
    dream_layers: tuple[int, ...] = ()  # decoder layers (entropy-chosen); features = hidden_states[i + 1]
    dream_super: int = -1  # decoder layer whose output supervises the cross-attention block
    compress: str = "none"  # none | pool | topk | queries
    pool: int = 2
    topk_keep: float = 0.5
    queries: int = 0  # entries replacing the image span (compress=queries)
    global_image: bool = False
    msd: bool = False
    aasd: bool = False
    aasd_layer: int = -1  # target decoder layer whose KV cache is read (-1 = last)
    flash: int = 1  # future heads per forward (1 = plain EAGLE)
    # training recipe
    unroll: int = 3  # training-time-test steps (EAGLE-3); loss weight 0.8**j
    w_feat: float = 0.5
    w_kl: float = 1.0
    # Cross-entropy on the target's most likely token: greedy acceptance is lost at near-ties of the
    # target, where KL's pull towards the right order is weak.
    w_top: float = 0.0
    w_inter: float = 0.2
    two_stage: bool = False  # MSD schedule: text-only, then a rising share of multimodal samples

    @property
    def L(self) -> int:
        return self.target_layers_n

    def hs_index(self, decoder_layer: int) -> int:
        """hidden_states index of a decoder layer's output."""
        return (decoder_layer % self.L) + 1

    @property
    def needs(self) -> dict[str, Any]:
        return {"saliency": self.compress == "topk", "adaptor": self.compress == "queries" or self.global_image}

    def target_layers(self) -> tuple[int, ...]:
        """hidden_states indices the drafter reads (non-negative)."""
        need = {0, self.L}
        if self.dream:
            need |= {self.hs_index(i) for i in self.dream_layers}
            if self.dream_super >= 0:
                need.add(self.hs_index(self.dream_super))
        if self.needs["saliency"]:
            need.add(self.L - 1)  # input of the last decoder layer: the saliency query
        return tuple(sorted(need))

    def recipe_differs(self, other: "FeatConfig") -> list[str]:
        """Options that make `other`'s weights unfit to start this drafter from (training-only options
        and the layer count, which --init grows, excluded)."""
        mine, theirs = self.options(), other.options()
        return sorted(k for k in set(mine) | set(theirs)
                      if k not in ("unroll", "n_layers", "w_top") and mine.get(k) != theirs.get(k))

    def options(self) -> dict[str, Any]:
        base = FeatConfig()
        skip = {"hidden", "heads", "kv_heads", "head_dim", "intermediate", "eps", "rope_theta", "target_layers_n", "vocab"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in skip and getattr(self, f.name) != getattr(base, f.name) or f.name == "variant"}


# Published recipes. Every variant shares the base (1 layer, EAGLE inputs, TTT unroll 3) so that the
# differences between them isolate one idea each. EAGLE-3 is not one: its drafter is a head in the
# vLLM / SGLang format (mmspec.drafters.eagle3_head, trained by mmspec.train_eagle3).
VARIANTS: dict[str, dict[str, Any]] = {
    "eagle": {},
    "dream": {"dream": True},
    "pool2": {"compress": "pool", "pool": 2},
    "pool4": {"compress": "pool", "pool": 4},
    "topk": {"compress": "topk", "topk_keep": 0.25},
    "vispec": {"compress": "queries", "queries": 1, "global_image": True},
    "msd": {"msd": True, "two_stage": True},
    "aasd": {"aasd": True},
    "flash": {"flash": 3, "compress": "queries", "queries": 16},
    "dream_topk": {"dream": True, "compress": "topk", "topk_keep": 0.75},
}


def text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def rope_theta(tc) -> float:
    params = getattr(tc, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(tc, "rope_theta", 10000.0) or 10000.0)


def make_config(variant: str, model, entropy_choice: tuple[list[int], int] | None = None, **overrides) -> FeatConfig:
    """A FeatConfig for `variant` (a name in VARIANTS) sized for the target `model`."""
    if variant not in VARIANTS:
        raise InputError(f"unknown feature-drafter variant {variant!r}: use one of {', '.join(VARIANTS)}")
    tc = text_config(model)
    heads = tc.num_attention_heads
    hd = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    L = tc.num_hidden_layers
    cfg = FeatConfig(
        variant=variant, hidden=tc.hidden_size, heads=heads, kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=hd, intermediate=tc.intermediate_size, eps=float(getattr(tc, "rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(tc), target_layers_n=L, vocab=tc.vocab_size,
    )
    cfg = replace(cfg, **VARIANTS[variant])
    if cfg.dream:
        if entropy_choice is None:
            raise InputError("the dream variant needs an attention-entropy profile to choose layers")
        chosen, sup = entropy_choice
        cfg = replace(cfg, dream_layers=tuple(chosen), dream_super=sup)
    cfg = replace(cfg, **overrides)
    if cfg.aasd and cfg.compress != "none":
        raise InputError("aasd reads the target's uncompressed cache; it does not combine with compression")
    if cfg.flash < 1:
        raise InputError("flash must be >= 1")
    return cfg


# ------------------------------------------------------------------------------------------------
# Network


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / rms(x) over the last dim (computed in float32 whatever x's dtype)."""
    return F.rms_norm(x, (x.shape[-1],), None, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # One call: on a GPU a fused kernel (the drafters are launch-bound; the unfused form was eight).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_of_angles(emb: torch.Tensor):
    """Angles [.., d] (the two halves equal) -> cos, sin with sin's first half negated: the sign
    rotate-half puts there, so `apply_rope` needs one roll."""
    half = emb.shape[-1] // 2
    sin = emb.sin()
    return emb.cos(), torch.cat((-sin[..., :half], sin[..., half:]), -1)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float):
    """[B, T] positions -> cos, sin [B, 1, T, head_dim] (float32, Llama's half-rotation layout, sin
    signed as `rope_of_angles` says)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    f = pos.float()[..., None] * inv
    cos, sin = rope_of_angles(torch.cat((f, f), -1))
    return cos[:, None], sin[:, None]


class RopeTable:
    """`rope_cos_sin` of positions 0..n-1 computed once: drafting looks rows up (two index ops a
    forward instead of the angle arithmetic). Held in the drafter's dtype, so `apply_rope` rotates
    without casts, as transformers' Llama does; in float32 the values are the formula's."""

    def __init__(self, n: int, head_dim: int, theta: float, device, dtype=torch.float32):
        cos, sin = rope_cos_sin(torch.arange(n, device=device)[None], head_dim, theta)
        self.cos, self.sin = cos[0, 0].to(dtype), sin[0, 0].to(dtype)  # [n, d]

    def __call__(self, pos: torch.Tensor):
        """pos [B, T] (every value below n) -> cos, sin [B, 1, T, d]."""
        B, T = pos.shape
        flat = pos.reshape(-1)
        return (self.cos.index_select(0, flat).view(B, 1, T, -1), self.sin.index_select(0, flat).view(B, 1, T, -1))


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = roll(x) times the sign folded into sin;
    in float32 unless cos is in x's dtype (a RopeTable's)."""
    if cos.dtype == x.dtype:
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, -1), sin).to(x.dtype)


def add_linear(residual: torch.Tensor, x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """residual + lin(x) for a bias-free linear, in one kernel (the residual add rides the matmul)."""
    out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), lin.weight.t())
    return out.view(residual.shape)


def attend(q, k, v, mask, null: bool = False):
    """q [B, h, Tq, d]; k, v [B, kv, Tk, d]; mask [B, Tq, Tk] bool (True = attend).

    null=True adds a zero key/value slot every query may attend to (a sink: no empty rows)."""
    B, h, Tq, d = q.shape
    kv = k.shape[1]
    if null:
        z = torch.zeros_like(k[:, :, :1])
        k, v = torch.cat([k, z], 2), torch.cat([v, z], 2)
        mask = torch.cat([mask, torch.ones_like(mask[..., :1])], -1)
    # Grouped-query attention without copying keys: query head i reads kv head i // (h // kv), so
    # the rep heads of a group are stacked along the query axis. Plain attention (no SDPA): shapes
    # change every step (trees, batches), some fused backends plan per shape, and the explicit form
    # is always the same math.
    rep = h // kv
    scores = torch.matmul(q.reshape(B, kv, rep * Tq, d), k.transpose(-1, -2)) * (d ** -0.5)
    scores = torch.where(mask[:, None, None], scores.view(B, kv, rep, Tq, -1), float("-inf"))
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype).view(B, kv, rep * Tq, -1)
    out = torch.matmul(probs, v).view(B, h, Tq, d)
    return out.transpose(1, 2).reshape(B, Tq, h * d)


class Attention(nn.Module):
    def __init__(self, c: FeatConfig, kv_in: int | None = None, qk_norm: bool = False):
        super().__init__()
        H, h, kv, d = c.hidden, c.heads, c.kv_heads, c.head_dim
        self.h, self.kv, self.d = h, kv, d
        self.q = nn.Linear(H, h * d, bias=False)
        self.k = nn.Linear(kv_in or H, kv * d, bias=False)
        self.v = nn.Linear(kv_in or H, kv * d, bias=False)
        self.o = nn.Linear(h * d, H, bias=False)
        self.q_norm = RMSNorm(d, c.eps) if qk_norm else None
        self.k_norm = RMSNorm(d, c.eps) if qk_norm else None

    def split(self, x, n):
        return x.view(x.shape[0], x.shape[1], n, self.d).transpose(1, 2)

    def qry(self, x, rope=None):
        q = self.split(self.q(x), self.h)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q, *rope) if rope is not None else q

    def kv_of(self, x, rope=None):
        k, v = self.split(self.k(x), self.kv), self.split(self.v(x), self.kv)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return (apply_rope(k, *rope) if rope is not None else k), v


class MLP(nn.Module):
    def __init__(self, H, I):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H, bias=False)

    def inner(self, x):
        """The activations `down` reads."""
        return F.silu(self.gate(x)) * self.up(x)

    def forward(self, x):
        return self.down(self.inner(x))


class Layer(nn.Module):
    def __init__(self, c: FeatConfig):
        super().__init__()
        self.in_norm = RMSNorm(c.hidden, c.eps)
        self.attn = Attention(c)
        self.post_norm = RMSNorm(c.hidden, c.eps)
        self.mlp = MLP(c.hidden, c.intermediate)


class CrossBlock(nn.Module):
    """DREAM: cross-attention into target features of the chosen layers, gated by tanh(0) at init."""

    def __init__(self, c: FeatConfig, n_mem_layers: int):
        super().__init__()
        self.norm = RMSNorm(c.hidden, c.eps)
        self.attn = Attention(c, qk_norm=True)
        self.gate = nn.Parameter(torch.zeros(1))
        self.layer_emb = nn.Parameter(torch.zeros(n_mem_layers, c.hidden))
        self.eps = c.eps

    def memory(self, feats: torch.Tensor):
        """feats [B, nL, T, H] -> keys, values [B, kv, nL * T, d] (layer-major)."""
        B, nL, T, H = feats.shape
        m = rms(feats, self.eps) + self.layer_emb[None, :, None].to(feats.dtype)
        return self.attn.kv_of(m.reshape(B, nL * T, H))

    def forward(self, h, K, V, mask):
        q = self.attn.qry(self.norm(h))
        return torch.tanh(self.gate).to(h.dtype) * self.attn.o(attend(q, K, V, mask, null=True))


class Adaptor(nn.Module):
    """ViSpec / FLASH: learnable queries cross-attending over the image embeddings."""

    def __init__(self, c: FeatConfig, n_queries: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, c.hidden) * 0.02)
        self.kv_norm = RMSNorm(c.hidden, c.eps)
        self.q_norm = RMSNorm(c.hidden, c.eps)
        self.attn = Attention(replace(c, kv_heads=c.heads))
        self.norm = RMSNorm(c.hidden, c.eps)
        self.mlp = MLP(c.hidden, c.hidden)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img [B, N, H] -> [B, n_queries, H]."""
        B = img.shape[0]
        qx = self.queries[None].expand(B, -1, -1).to(img.dtype)
        q = self.attn.qry(self.q_norm(qx))
        k, v = self.attn.kv_of(self.kv_norm(img))
        mask = torch.ones(B, q.shape[2], k.shape[2], dtype=torch.bool, device=img.device)
        out = qx + self.attn.o(attend(q, k, v, mask))
        return out + self.mlp(self.norm(out))


class FlashHead(nn.Module):
    def __init__(self, c: FeatConfig):
        super().__init__()
        self.norm = RMSNorm(c.hidden, c.eps)
        self.up = nn.Linear(c.hidden, c.hidden // 2, bias=False)
        self.down = nn.Linear(c.hidden // 2, c.hidden, bias=False)

    def forward(self, r):
        return r + self.down(F.silu(self.up(self.norm(r))))


class Shared:
    """The target's frozen pieces the drafter uses (held by reference, never saved or trained)."""

    def __init__(self, model):
        from mmspec.entropy import text_model

        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.norm = text_model(model).norm
        self.final_norm = _as_rms_norm(self.norm)


@torch.no_grad()
def _as_rms_norm(norm: nn.Module):
    """The target's final norm as one `F.rms_norm` call when a probe shows that is what it computes
    (Llama / Qwen / Mistral: weight * x / rms(x); on a GPU one kernel instead of eight), else the
    module itself (e.g. Gemma's (1 + weight) scaling)."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return norm
    if weight.is_meta or getattr(norm, "_hf_hook", None) is not None:  # offloaded: its hooks bring the weight
        return norm
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    want = norm(x).float()
    got = F.rms_norm(x, (weight.shape[0],), weight, eps).float()
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())):
        return norm
    return lambda h: F.rms_norm(h, (weight.shape[0],), weight, eps)


class FeatNet(nn.Module):
    def __init__(self, cfg: FeatConfig, shared: Shared):
        super().__init__()
        c = self.cfg = cfg
        H = c.hidden
        object.__setattr__(self, "shared", shared)  # not a submodule: never in state_dict/parameters
        self.fc = nn.Linear(2 * H, H)
        self.vis_fc = nn.Linear(H, H) if c.msd else None
        self.layers = nn.ModuleList([Layer(c) for _ in range(c.n_layers)])
        self.cross = CrossBlock(c, len(c.dream_layers)) if c.dream else None
        n_q = (c.queries if c.compress == "queries" else 0) + (1 if c.global_image else 0)
        self.adaptor = Adaptor(c, n_q) if n_q else None
        self.gfuse = nn.Linear(2 * H, H, bias=False) if c.global_image else None
        self.heads = nn.ModuleList([FlashHead(c) for _ in range(c.flash - 1)])
        if c.aasd:
            self.aasd_k = nn.Parameter(torch.eye(c.kv_heads))  # head mixing keeps the keys' rotation
            self.aasd_v = nn.Linear(c.kv_heads * c.head_dim, c.kv_heads * c.head_dim, bias=False)
        self.reset_special()

    @torch.no_grad()
    def reset_special(self):
        H = self.cfg.hidden
        if self.gfuse is not None:  # identity on x, zero on g
            self.gfuse.weight.zero_()
            self.gfuse.weight[:, :H] = torch.eye(H)
        if self.cfg.aasd:
            self.aasd_v.weight.copy_(torch.eye(self.aasd_v.weight.shape[0]))
        for hd in self.heads:
            hd.down.weight.mul_(0.1)

    # --- pieces shared by training and inference ------------------------------------------------
    @property
    def target_layers(self) -> tuple[int, ...]:
        return self.cfg.target_layers()

    def feature_in(self, hs: dict[int, torch.Tensor]) -> torch.Tensor:
        """The committed-position feature from target hidden states (by hidden_states index)."""
        return hs[self.cfg.L]

    def input_x(self, emb, feat, vis=None):
        x = self.fc(torch.cat([emb, feat.to(emb.dtype)], -1))
        if self.vis_fc is not None and vis is not None:
            x = torch.where(vis[..., None], self.vis_fc(emb), x)
        return x

    def fuse_global(self, x, g):
        return self.gfuse(torch.cat([x, g.expand_as(x)], -1))

    def aasd_memory(self, K, V):
        """Target cache keys/values [B, kv_t, T, d] -> the drafter's [B, kv, T, d]."""
        Km = torch.einsum("gh,bhtd->bgtd", self.aasd_k.to(K.dtype), K)
        B, _, T, d = V.shape
        Vm = self.aasd_v(V.transpose(1, 2).reshape(B, T, -1)).view(B, T, self.cfg.kv_heads, d).transpose(1, 2)
        return Km, Vm

    def head_feats(self, r):
        """Residual [.., H] -> predicted features of the next `flash` positions [.., k, H]."""
        outs = [r]
        for hd in self.heads:
            outs.append(hd(outs[-1]))
        if len(outs) == 1:  # no stack copy on the common path
            return self.shared.final_norm(r).unsqueeze(-2)
        return torch.stack([self.shared.final_norm(o) for o in outs], -2)

    def logits(self, f):
        return self.shared.lm_head(f)

    def run(self, x, pos, past, self_mask, aasd=None, cross=None, write_rows=None, rope_table=None):
        """The layer stack over new entries.

        x [B, T, H]; pos [B, T] RoPE positions; past: per layer (K, V) [B, kv, S, d] or None;
        self_mask [B, T, S + T] (columns: past, then the new entries); aasd: (K, V, mask [B, T, M])
        joined to the first layer's keys; cross: (K, V, mask [B, T, M]) for the DREAM block.
        With write_rows [T] (inference's preallocated cache), past holds whole buffers: the new
        keys/values are written at those rows and self_mask [B, T, S] covers every buffer row.
        rope_table (a RopeTable covering pos) replaces the angle arithmetic by a lookup.
        Returns residual [B, T, H], per-layer new (k, v), and the residual after the cross block.
        """
        c = self.cfg
        rope = rope_table(pos) if rope_table is not None else rope_cos_sin(pos, c.head_dim, c.rope_theta)
        h, new, xo = x, [], None
        for i, layer in enumerate(self.layers):
            a_in = layer.in_norm(h)
            q = layer.attn.qry(a_in, rope)
            k, v = layer.attn.kv_of(a_in, rope)
            new.append((k, v))
            K, V, M = k, v, self_mask
            if write_rows is not None:
                K, V = past[i][0].index_copy_(2, write_rows, k), past[i][1].index_copy_(2, write_rows, v)
            elif past is not None and past[i] is not None:
                K, V = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            if i == 0 and aasd is not None:
                K, V, M = torch.cat([aasd[0], K], 2), torch.cat([aasd[1], V], 2), torch.cat([aasd[2], M], -1)
            elif M.shape[-1] > K.shape[2]:  # inference: only the first layer's buffer holds AASD's rows
                M = M[..., : K.shape[2]]
            h = add_linear(h, attend(q, K, V, M), layer.attn.o)
            if i == 0 and self.cross is not None:
                h = h + self.cross(h, *cross)
                xo = h
            h = add_linear(h, layer.mlp.inner(layer.post_norm(h)), layer.mlp.down)
        return h, new, xo


def size_report(net: FeatNet) -> dict[str, Any]:
    n = sum(p.numel() for p in net.parameters())
    return {"params": n, "size_mb_fp16": round(n * 2 / 2**20, 2)}
