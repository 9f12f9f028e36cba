"""Feature-level drafters (EAGLE family) for VLM targets: one configurable network, many papers.

The drafter is one (or two) Llama-style decoder layer(s) that share the target's frozen token
embeddings, final norm and LM head (loaded from the target, never saved). Its own sequence has one
entry per target position p: input x_p = fc(concat(emb(token[p+1]), feature[p])), where feature[p]
is the target's last-layer hidden state at p (the engine's `hidden_states[-1]`, already final-normed
so that `lm_head(feature) = logits`). The output residual r_p gives the predicted next feature
f_{p+1} = norm(r_p), decoded by the target's LM head into the distribution of token[p+2]. While
drafting, a tree node's input takes its parent's *predicted* feature (autoregression over the tree);
the drafter keeps its own KV cache in preallocated buffers (`_Buffers`), feeds tree nodes after the
committed rows with a tree mask, and keeps only the committed rows (the rest are stale and masked).

Options (all switchable in `FeatConfig`; `VARIANTS` names the published recipes):
- fuse3 (EAGLE-3): feature = fc3(concat(rms(h_low), rms(h_mid), h_top)), init = identity on h_top;
  no feature-regression loss; every variant trains with EAGLE-3's training-time test (`unroll`).
- dream (DREAM): a cross-attention block after the first layer, tanh gate initialised at 0,
  RMSNorm on q and k, reading intermediate target features of layers chosen by attention entropy
  (`mmspec.entropy.choose_layers`); its output is also regressed onto the lowest-entropy layer.
- compress (visual-token compression of the drafter's view of the image span):
  `pool` (k x k spatial average), `topk` (keep the visual tokens that receive the most attention
  from the target's last layer), `queries` (ViSpec/FLASH: learnable queries cross-attend over the
  image embeddings and replace the image span, placed at its last positions). Each produces a
  per-visual-token status map (kept / merged / dropped) for the UI.
- global_image (ViSpec): an extra query gives a global image vector g fused into every text entry
  after the image: x <- gfuse(concat(x, g)), initialised to identity on x, zero on g.
- msd (MSD): visual entries take the raw projector embedding through their own path vis_fc(emb),
  no target feature; trained text-only first, then with a rising share of multimodal samples.
- aasd (AASD): no drafter entries for the prompt: the first layer attends to the target's own KV
  cache of the prompt + image (one target layer) through a learned projection (head mixing for the
  rotated keys, a linear map for the values).
- flash (FLASH): k > 1 semi-autoregressive heads: one drafter forward emits k future features
  (head j predicts f_{p+1+j}); deeper tree levels reuse them and the drafter runs once per k levels.

Which drafter entry is "visual": entry p pairs feature[p] with token[p+1]; it is visual when
token[p+1] is an image token. Visual token i of the image at sequence index v0 + i is entry v0 + i - 1.
The drafter uses 1-D RoPE over sequence indices (also for Qwen2-VL targets); the target's positions
are its own business, losslessness never depends on the drafter.

Where this departs from the papers (deliberately, to keep one small network): DREAM's
self/cross/self stack is one self-attention layer with the cross block between its attention and
MLP, and the entropy-chosen layers are chosen once per target (not per token); MSD keeps 1-D RoPE
(no M-RoPE in the drafter); AASD reads one target layer's cache (the last); FLASH's latent queries
are ViSpec's adaptor with more queries; EAGLE-3's "low/mid/high" are hidden_states[L/8], [L/2] and
the top feature (so that the fused input starts as EAGLE-1's).
"""
from __future__ import annotations

import hashlib
import json
import math
import weakref
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.drafters.model import DraftContext, Drafter
from mmspec.errors import InputError
from mmspec.graphs import DeviceNoise, GraphTable, replay
from mmspec.kvcache import to_device
from mmspec.trace import DraftTree
from mmspec import device_tree
from mmspec.tree import NO_TREE, Proposal, TreePool, TreeSpec, grow_tree, tree_attention
from mmspec.verify import Sampling, draft_probs, gumbel_scores

FORMAT = "mmspec-feature-drafter"
FORMAT_VERSION = 1
META_FILE = "mmspec_drafter.json"
WEIGHTS_FILE = "model.safetensors"

TEXT, VIS, QUERY = 0, 1, 2


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
    fuse3: bool = False
    fuse_layers: tuple[int, ...] = ()  # hidden_states indices (low, mid, top) when fuse3
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
        if self.fuse3:
            need |= set(self.fuse_layers)
        if self.dream:
            need |= {self.hs_index(i) for i in self.dream_layers}
            if self.dream_super >= 0:
                need.add(self.hs_index(self.dream_super))
        if self.needs["saliency"]:
            need.add(self.L - 1)  # input of the last decoder layer: the saliency query
        return tuple(sorted(need))

    def options(self) -> dict[str, Any]:
        base = FeatConfig()
        skip = {"hidden", "heads", "kv_heads", "head_dim", "intermediate", "eps", "rope_theta", "target_layers_n", "vocab"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in skip and getattr(self, f.name) != getattr(base, f.name) or f.name == "variant"}


# Published recipes. Every variant shares the base (1 layer, EAGLE inputs, TTT unroll 3) so that the
# differences between them isolate one idea each.
VARIANTS: dict[str, dict[str, Any]] = {
    "eagle": {},
    "eagle3": {"fuse3": True, "w_feat": 0.0},
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
    if cfg.fuse3:
        cfg = replace(cfg, fuse_layers=(max(1, L // 8), max(1, L // 2), L))
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
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * rms(x, self.eps)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float):
    """[B, T] positions -> cos, sin [B, 1, T, head_dim] (float32, Llama's half-rotation layout)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    f = pos.float()[..., None] * inv
    emb = torch.cat((f, f), -1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x, cos, sin):
    return (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)


def attend(q, k, v, mask, null: bool = False):
    """q [B, h, Tq, d]; k, v [B, kv, Tk, d]; mask [B, Tq, Tk] bool (True = attend).

    null=True adds a zero key/value slot every query may attend to (a sink: no empty rows)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if null:
        z = torch.zeros_like(k[:, :, :1])
        k, v = torch.cat([k, z], 2), torch.cat([v, z], 2)
        mask = torch.cat([mask, torch.ones_like(mask[..., :1])], -1)
    # Plain attention (no SDPA): shapes change every step (trees, batches) and some fused backends
    # build a plan per shape; at this width the explicit form is as fast and always the same math.
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, -1).to(v.dtype), v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


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

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


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


class FeatNet(nn.Module):
    def __init__(self, cfg: FeatConfig, shared: Shared):
        super().__init__()
        c = self.cfg = cfg
        H = c.hidden
        object.__setattr__(self, "shared", shared)  # not a submodule: never in state_dict/parameters
        self.fc = nn.Linear(2 * H, H)
        self.vis_fc = nn.Linear(H, H) if c.msd else None
        self.fuse = nn.Linear(3 * H, H, bias=False) if c.fuse3 else None
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
        if self.fuse is not None:  # starts as EAGLE-1: the top feature only
            self.fuse.weight.zero_()
            self.fuse.weight[:, 2 * H:] = torch.eye(H)
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
        c = self.cfg
        if not c.fuse3:
            return hs[c.L]
        lo, mid, top = c.fuse_layers
        return self.fuse(torch.cat([rms(hs[lo], c.eps), rms(hs[mid], c.eps), hs[top]], -1))

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
        return torch.stack([self.shared.norm(o) for o in outs], -2)

    def logits(self, f):
        return self.shared.lm_head(f)

    def run(self, x, pos, past, self_mask, aasd=None, cross=None, write_rows=None):
        """The layer stack over new entries.

        x [B, T, H]; pos [B, T] RoPE positions; past: per layer (K, V) [B, kv, S, d] or None;
        self_mask [B, T, S + T] (columns: past, then the new entries); aasd: (K, V, mask [B, T, M])
        joined to the first layer's keys; cross: (K, V, mask [B, T, M]) for the DREAM block.
        With write_rows [T] (inference's preallocated cache), past holds whole buffers: the new
        keys/values are written at those rows and self_mask [B, T, S] covers every buffer row.
        Returns residual [B, T, H], per-layer new (k, v), and the residual after the cross block.
        """
        c = self.cfg
        rope = rope_cos_sin(pos, c.head_dim, c.rope_theta)
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
            h = h + layer.attn.o(attend(q, K, V, M))
            if i == 0 and self.cross is not None:
                h = h + self.cross(h, *cross)
                xo = h
            h = h + layer.mlp(layer.post_norm(h))
        return h, new, xo


def size_report(net: FeatNet) -> dict[str, Any]:
    n = sum(p.numel() for p in net.parameters())
    return {"params": n, "size_mb_fp16": round(n * 2 / 2**20, 2)}


# ------------------------------------------------------------------------------------------------
# The drafter's view of the prompt: entries, compression, visual maps


@dataclass
class Entry:
    members: list[int]  # drafter positions averaged into this entry
    rope: int
    kind: int = TEXT  # TEXT, VIS or QUERY
    slot: int = -1  # adaptor output index for QUERY entries
    post: bool = False  # a text entry after the image (ViSpec global fusion)

    @property
    def src(self) -> int:
        return max(self.members)


def image_grid(n: int, size: tuple[int, int] | None = None, processor=None, image=None) -> tuple[int, int]:
    """(rows, cols) of the visual tokens: the processor's own grid where it has one (Qwen2-VL),
    else the factorisation of n closest to the image's aspect ratio (LLaVA: 196 -> 14 x 14)."""
    ip = getattr(processor, "image_processor", None)
    if ip is not None and image is not None and hasattr(ip, "merge_size"):
        try:
            thw = ip(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
            m = int(ip.merge_size)
            r, c = int(thw[1]) // m, int(thw[2]) // m
            if r * c == n:
                return r, c
        except Exception:  # noqa: BLE001 - fall back to the aspect ratio
            pass
    aspect = (size[1] / size[0]) if size else 1.0  # rows / cols = height / width
    best = (1, n)
    for r in range(1, n + 1):
        if n % r == 0 and abs(math.log(r / (n // r)) - math.log(aspect)) < abs(math.log(best[0] / best[1]) - math.log(aspect)):
            best = (r, n // r)
    return best


def plan_entries(n_pos: int, span: tuple[int, int] | None, grid: tuple[int, int] | None, cfg: FeatConfig,
                 saliency: list[float] | None = None, own_from: int = 0) -> tuple[list[Entry], dict | None]:
    """Entries for drafter positions own_from..n_pos-1, and the visual map (None without compression).

    span = (v0, n): the image tokens' sequence indices v0..v0+n-1; visual entry i is position v0+i-1.
    """
    entries: list[Entry] = []
    if span is None:
        return [Entry([p], p) for p in range(own_from, n_pos)], None
    v0, n = span
    vis_lo, vis_hi = v0 - 1, v0 + n - 2  # drafter positions of the visual entries
    pre = [Entry([p], p) for p in range(own_from, min(vis_lo, n_pos))]
    post = [Entry([p], p, post=True) for p in range(max(vis_hi + 1, own_from), n_pos)]
    vpos = [v0 - 1 + i for i in range(n)]
    ok = [p >= own_from and 0 <= p < n_pos for p in vpos]
    status = ["kept"] * n
    groups = list(range(n))
    vis: list[Entry] = []
    mode = cfg.compress
    if mode == "pool":
        rows, cols = grid
        k = cfg.pool
        gcols = -(-cols // k)
        by_group: dict[int, list[int]] = {}
        for i in range(n):
            g = (i // cols) // k * gcols + (i % cols) // k
            groups[i] = g
            by_group.setdefault(g, []).append(i)
        for g in sorted(by_group):
            idx = [i for i in by_group[g] if ok[i]]
            if idx:
                vis.append(Entry([vpos[i] for i in idx], max(vpos[i] for i in idx), VIS))
            for i in by_group[g]:
                status[i] = "merged" if len(by_group[g]) > 1 else "kept"
    elif mode == "topk":
        keep = max(1, round(cfg.topk_keep * n))
        sal = saliency if saliency is not None else [0.0] * n
        top = sorted(sorted(range(n), key=lambda i: (-sal[i], i))[:keep])
        topset = set(top)
        status = ["kept" if i in topset else "dropped" for i in range(n)]
        vis = [Entry([vpos[i]], vpos[i], VIS) for i in top if ok[i]]
    elif mode == "queries":
        nq = min(cfg.queries, n)
        status = ["merged"] * n
        groups = [0] * n
        last = [p for p, o in zip(vpos, ok) if o][-nq:] if any(ok) else []
        vis = [Entry([p], p, QUERY, slot=j) for j, p in enumerate(last)]
    else:
        vis = [Entry([vpos[i]], vpos[i], VIS) for i in range(n) if ok[i]]
    vmap = None
    if mode != "none":
        vmap = {"grid": list(grid), "status": status, "groups": groups, "mode": mode}
        if saliency is not None:
            vmap["saliency"] = [round(float(s), 5) for s in saliency]
    return pre + vis + post, vmap


def image_span(ids: list[int], image_id) -> tuple[int, int] | None:
    """(first index, length) of the image placeholders in `ids`; image_id: one id or a set of them
    (a family's media_token_ids)."""
    if image_id is None:
        return None
    media = {image_id} if isinstance(image_id, int) else set(image_id)
    idx = [i for i, t in enumerate(ids) if t in media]
    if not idx:
        return None
    if idx[-1] - idx[0] + 1 != len(idx):
        raise InputError("feature drafters support one contiguous image span per prompt")
    return idx[0], len(idx)


# ------------------------------------------------------------------------------------------------
# Target fingerprint, save / load


def target_fingerprint(model) -> dict[str, Any]:
    tc = text_config(model)
    w = model.get_output_embeddings().weight.detach()[:16].float().cpu()
    bits = (w > 0).to(torch.uint8).numpy().tobytes()  # signs survive any dtype cast
    return {
        "model_type": model.config.model_type, "hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers,
        "vocab_size": tc.vocab_size, "lm_head_sign_sha": hashlib.sha256(bits).hexdigest()[:16],
    }


def save_feature_drafter(drafter: "FeatureDrafter", path: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    net = drafter.net
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    meta = dict(drafter.meta)
    meta.update({
        "format": FORMAT, "version": FORMAT_VERSION, "variant": net.cfg.variant, "config": asdict(net.cfg),
        "target": target_fingerprint(drafter.target.model), **size_report(net), **(extra or {}),
    })
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def load_feature_drafter(path: str | Path, target) -> "FeatureDrafter":
    path = Path(path)
    meta = _read_meta(path)
    want, have = meta.get("target"), target_fingerprint(target.model)
    if not isinstance(want, dict):
        raise InputError(f"{path}/{META_FILE} has no 'target' object: cannot tell which target it was trained for")
    diff = [k for k in have if want.get(k) != have[k]]
    if diff:
        raise InputError(
            f"feature drafter {path} was trained for another target: "
            + ", ".join(f"{k} {want.get(k)!r} (this target: {have[k]!r})" for k in diff)
            + ". A feature drafter reads the target's hidden states and shares its LM head; use one trained for this target."
        )
    cfg = _checked_config(meta.get("config"), target, path)
    try:
        net = FeatNet(cfg, Shared(target.model))
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        raise InputError(f"{path}: cannot build a drafter from its config ({type(e).__name__}: {e})") from e
    _load_weights(net, path)
    net = net.to(target.device, target.dtype).eval()
    return FeatureDrafter(net, target, name=str(meta.get("name") or path.name), meta=meta)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise InputError(f"{path} is not a feature drafter: cannot read {META_FILE} ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{path}/{META_FILE} is not an mmspec feature-drafter file")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(f"{path}/{META_FILE}: 'version' is not an integer")
    if version > FORMAT_VERSION:
        raise InputError(f"{path} was written by a newer mmspec (format {version})")
    return meta


# Fields copied from the target when a drafter is made: a saved config must agree with this target.
_TARGET_SIZED = ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "target_layers_n", "vocab")
# The largest architecture a saved config may ask for: a crafted file must not make the loader
# allocate a thousand layers. (low, high) inclusive.
_CONFIG_RANGES = {"n_layers": (1, 16), "flash": (1, 16), "queries": (0, 4096), "pool": (1, 64), "unroll": (1, 64)}
_COMPRESS = ("none", "pool", "topk", "queries")


def _checked_config(raw, target, path: Path) -> FeatConfig:
    """The saved config as a FeatConfig, every field type- and range-checked against this target."""
    if not isinstance(raw, dict):
        raise InputError(f"{path}/{META_FILE}: 'config' is not an object")
    sized = make_config("eagle", target.model)  # this target's sizes; other fields at their defaults
    values = {f.name: _checked_field(f.name, raw[f.name], getattr(sized, f.name), path)
              for f in fields(FeatConfig) if f.name in raw}
    cfg = replace(sized, **values)
    for k in _TARGET_SIZED:
        if getattr(cfg, k) != getattr(sized, k):
            raise InputError(f"{path}: config {k}={getattr(cfg, k)} does not match this target's {getattr(sized, k)}")
    for k, (lo, hi) in _CONFIG_RANGES.items():
        if not lo <= getattr(cfg, k) <= hi:
            raise InputError(f"{path}: config {k}={getattr(cfg, k)} is outside [{lo}, {hi}]")
    L = cfg.target_layers_n
    layers_ok = (all(0 <= i <= L for i in cfg.fuse_layers) and (len(cfg.fuse_layers) == 3 or not cfg.fuse3)
                 and all(-L <= i < L for i in (*cfg.dream_layers, cfg.aasd_layer)) and len(cfg.dream_layers) <= L
                 and -1 <= cfg.dream_super < L and (len(cfg.dream_layers) > 0 or not cfg.dream))
    if not layers_ok or cfg.compress not in _COMPRESS or not 0 < cfg.topk_keep <= 1:
        raise InputError(f"{path}: config names target layers or options this target does not have")
    return cfg


def _checked_field(name: str, value, default, path: Path):
    """`value` if it has the type of `default` (JSON lists become tuples), else an InputError."""
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
        ok = all(type(x) is int for x in value)
    elif isinstance(default, float):
        ok = type(value) in (int, float) and math.isfinite(value)
    else:  # bool, int and str must match exactly (True is not a layer count)
        ok = type(value) is type(default)
    if not ok:
        raise InputError(f"{path}: config field {name} has a value of the wrong type ({str(value)[:40]})")
    return value


def _load_weights(net: "FeatNet", path: Path) -> None:
    from safetensors.torch import load_file

    if not (path / WEIGHTS_FILE).is_file():
        raise InputError(f"{path} lacks {WEIGHTS_FILE}")
    try:
        missing, unexpected = net.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)
    except Exception as e:  # noqa: BLE001 - safetensors' own error on a damaged file; torch's on a shape mismatch
        raise InputError(f"{path}/{WEIGHTS_FILE} cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from e
    if missing or unexpected:
        raise InputError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def is_feature_drafter(path) -> bool:
    try:
        return (Path(path) / META_FILE).is_file()
    except (OSError, TypeError):
        return False


# ------------------------------------------------------------------------------------------------
# Calibration (entropy profile) for a drafter built without training


def default_calibration(n: int = 4):
    """(image, prompt) pairs: the synthetic world's if available, else a plain image."""
    try:
        from mmspec.world import held_out_seeds, sample_example

        out = []
        for s in held_out_seeds(n, offset=900_000):
            img, qa, _ = sample_example(s)
            out.append((img, qa.prompt + "\n" + qa.answer))
        return out
    except Exception:  # noqa: BLE001 - world.py is optional for the engine
        from PIL import Image

        return [(Image.new("RGB", (64, 64), (120, 160, 200)), "Describe the image.")] * n


@torch.no_grad()
def calibrate_entropy(target, examples=None) -> list[float]:
    """Entropy profile of the target (see mmspec.entropy) over post-image text positions of prompts."""
    from mmspec import entropy
    from mmspec.model import CachedModel

    examples = examples or default_calibration()
    image_id = target.family.media_token_ids(target.model.config)
    acc = None
    for img, prompt in examples:
        cm = CachedModel(target.model, target.family)
        inputs = target.family.prefill_inputs(target.processor, img, prompt)
        _, hs = cm.prefill(inputs, hidden=True)
        ids = inputs["input_ids"][0].tolist()
        span = image_span(ids, image_id)
        T = len(ids)
        start = span[0] + span[1] if span else 1
        qmask = torch.zeros(1, T, dtype=torch.bool)
        qmask[0, start:] = True
        pos = target.family.prefill_position_ids(target.model, inputs)
        if pos is None:
            pos = target.family.position_ids(torch.arange(T), 0)
        pos = pos.to(target.device)
        keys = [layer.keys for layer in cm.cache.layers]
        prof = entropy.entropy_profile(target.model, hs, keys, pos, qmask)
        acc = prof if acc is None else [a + b for a, b in zip(acc, prof)]
    return [a / len(examples) for a in acc]


def create_feature_drafter(variant: str, target, seed: int = 0, profile: list[float] | None = None,
                           **overrides) -> "FeatureDrafter":
    """An untrained (random-init) drafter of a variant for `target`: for tests and as the start of training."""
    from mmspec import entropy

    profile = profile if profile is not None else calibrate_entropy(target)
    choice = entropy.choose_layers(profile)
    cfg = make_config(variant, target.model, choice, **overrides)
    torch.manual_seed(seed)
    net = FeatNet(cfg, Shared(target.model)).to(target.device, target.dtype).eval()
    meta = {"name": f"feat-{variant}", "entropy_profile": profile, "chosen_layers": list(choice[0]),
            "supervised_layer": choice[1], "trained": False}
    return FeatureDrafter(net, target, name=f"feat-{variant}", meta=meta)


# ------------------------------------------------------------------------------------------------
# The engine-facing drafter


_BIG = 2**62  # DREAM memory rows not yet written carry this position: no entry ever sees them


class _Buffers:
    """Preallocated state of one drafter network, leased per network and reused by later requests
    (CUDA graphs captured over it hold these addresses): its KV cache, the target features it
    reads, DREAM's memory, AASD's projected target cache, ViSpec's global vector and the root's
    predicted features. Rows past what a request wrote are stale and masked out."""

    def __init__(self, net: FeatNet, cap: int, device: torch.device, dtype: torch.dtype):
        c = net.cfg
        self.cap = cap
        z = lambda *shape: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        self.kv = [(z(1, c.kv_heads, cap, c.head_dim), z(1, c.kv_heads, cap, c.head_dim)) for _ in net.layers]
        self.F = {idx: z(cap, c.hidden) for idx in net.target_layers}
        self.cols = torch.arange(cap, device=device)
        m = len(c.dream_layers) * cap
        self.cross = ((z(1, c.kv_heads, m, c.head_dim), z(1, c.kv_heads, m, c.head_dim),
                       torch.full((m,), _BIG, dtype=torch.long, device=device)) if net.cross is not None else None)
        self.aasd = (z(1, c.kv_heads, cap, c.head_dim), z(1, c.kv_heads, cap, c.head_dim)) if c.aasd else None
        self.aasd_n = torch.zeros((), dtype=torch.long, device=device)  # prompt rows in `aasd`
        self.g = z(c.hidden) if c.global_image else None
        self.root = z(c.flash, c.hidden)  # predicted features after the last committed entry
        self.graphs = GraphTable(device)

    def copy_from(self, old: "_Buffers") -> None:
        """Take over what `old` (smaller) holds: the eager path grows its buffers this way."""
        n = old.cap
        for (k, v), (ok, ov) in zip(self.kv, old.kv):
            k[:, :, :n], v[:, :, :n] = ok, ov
        for idx, f in self.F.items():
            f[:n] = old.F[idx]
        if self.cross is not None:
            m = old.cross[2].shape[0]
            self.cross[0][:, :, :m], self.cross[1][:, :, :m] = old.cross[0], old.cross[1]
            self.cross[2][:m] = old.cross[2]
        if self.aasd is not None:
            self.aasd[0][:, :, :n], self.aasd[1][:, :, :n] = old.aasd
        self.aasd_n.copy_(old.aasd_n)
        if self.g is not None:
            self.g.copy_(old.g)
        self.root.copy_(old.root)


_FREE_BUFFERS: "weakref.WeakKeyDictionary[FeatNet, list[_Buffers]]" = weakref.WeakKeyDictionary()


def _lease(net: FeatNet, rows: int, device: torch.device, dtype: torch.dtype) -> _Buffers:
    free = _FREE_BUFFERS.setdefault(net, [])
    for i, buf in enumerate(free):
        if buf.cap >= rows:
            return free.pop(i)
    return _Buffers(net, -(-rows // 256) * 256, device, dtype)  # rounded up so later prompts reuse it


@dataclass
class _Request:
    """What one prompt's decoding holds in the drafter (host side; tensors live in `_Buffers`)."""

    prompt_ids: list[int]
    span: tuple[int, int] | None  # the image tokens (first index, count)
    plan: list[Entry]  # the drafter's entries for the prompt
    visual_map: dict | None
    adapt: torch.Tensor | None  # adaptor outputs (QUERY entries; the last is ViSpec's global vector)
    fast_path: bool  # chains and dynamic trees drafted on the device (`_run_step`), else grown by grow_tree
    graphed: bool  # ... and replayed from CUDA graphs
    n_feat: int  # target features held (committed target positions)
    n_cache: int = 0  # committed drafter entries (KV rows)
    n_fed: int = 0  # drafter positions fed (committed)
    forwards: int = 0  # drafter forwards this step
    global_vector: bool = False  # the variant has ViSpec's global image vector

    @property
    def P(self) -> int:
        return len(self.prompt_ids)

    @property
    def global_image(self) -> bool:
        """ViSpec's global vector is fused into text entries (only when the prompt has an image)."""
        return self.adapt is not None and self.global_vector


class FeatureDrafter(Drafter):
    kind = "feature"

    def __init__(self, net: FeatNet, target, name: str = "feature", meta: dict | None = None):
        self.net = net
        self.target = target
        self.name = name
        self.meta = dict(meta or {})
        self.cfg = net.cfg
        self.target_layers = net.target_layers
        self._row = {idx: i for i, idx in enumerate(self.target_layers)}
        self.req: _Request | None = None
        self.buf: _Buffers | None = None
        self._noise = DeviceNoise()

    def info(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "name": self.name, "kind": self.kind, "variant": c.variant, "options": _jsonable(c.options()),
            "entropy_profile": [round(float(x), 5) for x in self.meta.get("entropy_profile", [])],
            "chosen_layers": list(c.dream_layers) if c.dream else list(self.meta.get("chosen_layers", [])),
            "dream_uses_chosen_layers": c.dream, "supervised_layer": self.meta.get("supervised_layer"),
            "target_layers": list(self.target_layers), "trained": self.meta.get("trained", True),
            "quality": self.meta.get("quality"), **size_report(self.net),
        }

    @property
    def _dev(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def _dt(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    # --- per prompt ---------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, ctx: DraftContext) -> None:
        self.finish()
        net, c, tgt, dev = self.net, self.cfg, ctx.target, self._dev
        ids = list(ctx.prompt_ids)
        P = len(ids)
        # The fast path's room bounds every row a request writes; eagerly the buffers grow instead.
        fast = ctx.cache_room is not None
        buf = self.buf = _lease(net, P + (ctx.cache_room if fast else 256), dev, self._dt)
        hid = ctx.target_hidden.to(dev, self._dt)  # [n_layers, P, H]
        for idx, r in self._row.items():
            buf.F[idx][:P] = hid[r]
        span = image_span(ids, tgt.family.media_token_ids(tgt.model.config))
        adapt, saliency, grid = None, None, None
        if span is not None:
            v0, n = span
            size = ctx.image.size if ctx.image is not None else None
            grid = image_grid(n, size, tgt.processor, ctx.image) if c.compress != "none" else None
            if c.needs["saliency"]:
                saliency = self._saliency(ctx, span, P).tolist()
            if net.adaptor is not None:
                adapt = net.adaptor(buf.F[0][v0 : v0 + n][None])[0]
                if c.global_image:
                    buf.g.copy_(adapt[-1])
        plan, vmap = plan_entries(P, span, grid, c, saliency, P - 1 if c.aasd else 0)
        if c.aasd:
            layer = ctx.target_cache.cache.layers[c.aasd_layer % c.L]
            K, V = net.aasd_memory(layer.keys[:, :, : P - 1].to(dev, self._dt), layer.values[:, :, : P - 1].to(dev, self._dt))
            buf.aasd[0][:, :, : P - 1], buf.aasd[1][:, :, : P - 1] = K, V
            buf.aasd_n.fill_(P - 1)
        if buf.cross is not None:
            buf.cross[2].fill_(_BIG)
        self.req = _Request(ids, span, plan, vmap, adapt, fast, fast and ctx.cuda_graphs and dev.type == "cuda", P,
                            global_vector=c.global_image)
        self._noise.reset()

    def finish(self) -> None:
        if self.buf is not None:
            _FREE_BUFFERS.setdefault(self.net, []).append(self.buf)
        self.buf, self.req = None, None

    def _saliency(self, ctx, span, P) -> torch.Tensor:
        from mmspec import entropy

        v0, n = span
        c = self.cfg
        q = torch.arange(v0 + n, P)
        if len(q) == 0:
            q = torch.tensor([P - 1])
        tm = ctx.target_cache
        pos = ctx.target.family.position_ids(q, tm.rope_offset).to(self._dev)
        h_in = self.buf.F[c.L - 1][q.to(self._dev)][None]
        keys = tm.cache.layers[c.L - 1].keys[:, :, :P]
        qmask = torch.ones(1, len(q), dtype=torch.bool)
        sal = entropy.visual_saliency(ctx.target.model, h_in, keys, pos, q[None], qmask, torch.tensor([v0]), n)
        return sal[0].float().cpu()

    @torch.no_grad()
    def observe(self, target_hidden: torch.Tensor, tokens: list[int]) -> None:
        req, k = self.req, target_hidden.shape[1]
        self._reserve(req.n_feat + k)
        hid = target_hidden.to(self._dev, self._dt)
        for idx, r in self._row.items():
            self.buf.F[idx][req.n_feat : req.n_feat + k] = hid[r]
        req.n_feat += k

    def _reserve(self, rows: int) -> None:
        """Room for `rows` entries / features: larger buffers take over (graphs are captured anew
        for them; on the fast path the engine's room makes this rare)."""
        old = self.buf
        if rows <= old.cap:
            return
        self.buf = _lease(self.net, max(rows, 2 * old.cap), self._dev, self._dt)
        self.buf.copy_from(old)
        _FREE_BUFFERS.setdefault(self.net, []).append(old)

    # --- network pieces over the buffers ----------------------------------------------------------
    def _embed(self, toks: torch.Tensor) -> torch.Tensor:
        return self.net.shared.embed(toks).to(self._dt)

    def _forward(self, x, pos, rows, src=None, allowed=None):
        """Entries x [T, H] at RoPE positions pos [T], written at cache rows [T] (device tensors).
        allowed [T, cap]: which rows each entry sees (default: every row up to its own, i.e. the
        committed entries and the entries fed before it in this call). src [T]: the last feature
        position each entry may read in DREAM's memory (None = all)."""
        net, buf = self.net, self.buf
        T = x.shape[0]
        if allowed is None:
            allowed = buf.cols[None, :] <= rows[:, None]
        aasd = None
        if buf.aasd is not None:
            aasd = (*buf.aasd, (buf.cols < buf.aasd_n)[None, None].expand(1, T, buf.cap))
        cross = None
        if buf.cross is not None:
            lim = src if src is not None else torch.full((T,), _BIG - 1, device=x.device)
            cross = (buf.cross[0], buf.cross[1], (buf.cross[2][None, :] <= lim[:, None])[None])
        r, _, _ = net.run(x[None], pos[None], buf.kv, allowed[None], aasd, cross, write_rows=rows)
        return net.head_feats(r[0])  # [T, flash, H]

    def _write_memory(self, lo, ps: torch.Tensor) -> None:
        """DREAM: the chosen layers' features at positions ps (lo, lo+1, ...) into the memory."""
        net, c, buf = self.net, self.cfg, self.buf
        if buf.cross is None:
            return
        nL = len(c.dream_layers)
        feats = torch.stack([buf.F[c.hs_index(i)].index_select(0, ps) for i in c.dream_layers])[None]
        K, V = net.cross.memory(feats)  # [1, kv, nL * k, d], layer-major
        rows = lo * nL + torch.arange(nL * len(ps), device=ps.device)
        buf.cross[0].index_copy_(2, rows, K)
        buf.cross[1].index_copy_(2, rows, V)
        buf.cross[2].index_copy_(0, rows, ps.repeat(nL))

    def _inputs(self, toks: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Text entries: fc(emb(token), feature), then ViSpec's global image fusion."""
        x = self.net.input_x(self._embed(toks), feats)
        return self.net.fuse_global(x, self.buf.g) if self.req.global_image else x

    # --- the prompt (eager, once per request) -----------------------------------------------------
    def _feed_prompt(self, seq: list[int], upto: int) -> None:
        net, req, buf, dev = self.net, self.req, self.buf, self._dev
        P, entries = req.P, list(req.plan) + [Entry([p], p, post=req.span is not None) for p in range(req.P, upto + 1)]
        # Per-position inputs x_p = input(emb(token[p+1]), feature[p]) for p in 0..upto; inside the
        # prompt emb is the target's own input embedding (image features at image tokens).
        emb = torch.cat([buf.F[0][1 : min(P, upto + 2)], self._embed(torch.tensor(seq[P : upto + 2], device=dev))])
        vis = torch.zeros(upto + 1, dtype=torch.bool, device=dev)
        if req.span is not None:
            v0, n = req.span
            vis[v0 - 1 : v0 + n - 1] = True
        hs = {idx: f[: upto + 1] for idx, f in buf.F.items()}
        xp = net.input_x(emb, net.feature_in(hs), vis)
        xs = []
        for e in entries:
            if e.kind == QUERY:
                xs.append(req.adapt[e.slot])
                continue
            x = xp[e.members[0]] if len(e.members) == 1 else xp[torch.tensor(e.members, device=dev)].mean(0)
            xs.append(net.fuse_global(x, buf.g) if e.post and req.global_image else x)
        self._reserve(len(entries))
        self._write_memory(0, torch.arange(upto + 1, device=dev))
        pos = torch.tensor([e.rope for e in entries], device=dev)
        src = torch.tensor([e.src for e in entries], device=dev)
        heads = self._forward(torch.stack(xs), pos, torch.arange(len(entries), device=dev), src)
        buf.root.copy_(heads[-1])
        req.n_cache, req.n_fed = len(entries), upto + 1
        req.forwards += 1

    # --- one step: feed what was accepted, then draft --------------------------------------------
    def _feed_accepted(self, k: int, ints) -> None:
        """The k entries committed since the last step, from ints = [first cache row, first drafter
        position, the k tokens]; the last one's predicted features become the root's."""
        if not k:
            return
        buf, row, lo = self.buf, ints[0], ints[1]
        ps = lo + torch.arange(k, device=ints.device)
        self._write_memory(lo, ps)
        feats = self.net.feature_in({idx: f.index_select(0, ps) for idx, f in buf.F.items()})
        heads = self._forward(self._inputs(ints[2 : 2 + k], feats), ps, row + ps - lo, ps)
        buf.root.copy_(heads[-1])

    def _step_body(self, k: int, depth: int, sampling: Sampling, ints, noise):
        """Feed the accepted entries, then draft a chain of `depth` tokens from the new root, all on
        the device (one CUDA graph per (k, depth, sampling) on a GPU). Returns the chain's tokens
        [depth], their q [depth] and q rows [depth, V] (nothing when depth is 0)."""
        self._feed_accepted(k, ints)
        return self._chain(ints[0] + k, ints[1] + k - 1, depth, sampling, noise) if depth else None

    def _tree_body(self, k: int, spec: TreeSpec, sampling: Sampling, ints, noise) -> device_tree.DeviceTree:
        """Feed the accepted entries, then grow an EAGLE-2 dynamic tree on the device."""
        self._feed_accepted(k, ints)
        net, buf = self.net, self.buf
        base = ints[1] + k - 1  # RoPE position of the root entry

        def expand(depth, tokens, feeds, rows, allowed):
            heads = self._forward(self._inputs(tokens, feeds), (base + depth).expand(rows.shape), rows, None, allowed)[:, 0]
            return draft_probs(net.logits(heads), sampling), heads

        root_q = draft_probs(net.logits(buf.root[0])[None], sampling)[0]
        return device_tree.grow(expand, root_q, buf.root[0], spec, ints[0] + k, buf.cols, noise)

    def _chain(self, row, base, depth: int, sampling: Sampling, noise):
        """Draft `depth` tokens after the root (RoPE position `base`), writing fed nodes from cache
        row `row` on. FLASH's k heads give k levels per forward: a node is fed with the feature that
        predicted it once its anchor's heads are used up."""
        net, kf, dev = self.net, self.cfg.flash, self.buf.root.device
        heads, j, since = self.buf.root, 0, []
        toks, probs, rows = [], [], []
        for d in range(depth):
            if j == kf:  # feed the kf nodes drafted since the anchor (depths d-kf+1..d)
                steps = torch.arange(kf, device=dev)
                x = self._inputs(torch.cat([t for t, _ in since]), torch.stack([f for _, f in since]))
                heads = self._forward(x, base + d - kf + 1 + steps, row + steps)[-1]
                row, j, since = row + kf, 0, []
            f = heads[j]
            q = draft_probs(net.logits(f)[None], sampling)[0]
            score = q.log() if noise is None else gumbel_scores(q.log(), noise[d])
            token = score.argmax().view(1)
            toks.append(token)
            probs.append(q.gather(0, token))
            rows.append(q)
            since.append((token, f))
            j += 1
        return torch.cat(toks), torch.cat(probs), torch.stack(rows)

    def _run_step(self, new_tokens: list[int], spec: TreeSpec, sampling: Sampling, gen):
        """Feed the accepted tokens and draft `spec` (a chain, a dynamic tree, or nothing: kind
        "none") in one body on the device, replayed from a CUDA graph per shape on a GPU."""
        req, dev = self.req, self._dev
        k, tree = len(new_tokens), spec.kind == "dynamic"
        self._reserve(req.n_cache + k + (device_tree.tree_rows(spec) if tree else spec.depth) + 1)
        ints = to_device(torch.tensor([req.n_cache, req.n_fed, *new_tokens], dtype=torch.long), dev)
        noise = None
        if spec.kind != "none" and not sampling.greedy:
            shape = (spec.depth, spec.topk) if tree else (spec.depth,)
            vocab = self.net.shared.lm_head.weight.shape[0]
            noise = self._noise.uniforms(math.prod(shape), vocab, dev, gen).view(*shape, vocab)
        if tree:
            body = lambda *bufs: self._tree_body(k, spec, sampling, *bufs)  # noqa: E731
        else:
            body = lambda *bufs: self._step_body(k, spec.depth, sampling, *bufs)  # noqa: E731
        if req.graphed and self.buf.graphs.usable("decode"):
            key = ("step", k, spec, sampling, noise is None, req.global_image)
            out = replay(self.buf.graphs, key, body, (ints, noise))
        else:
            out = body(ints, noise)
        req.n_cache += k
        req.n_fed += k
        req.forwards += (1 if k else 0) + (spec.depth - 1 if tree else max(spec.depth - 1, 0) // self.cfg.flash)
        return out

    @torch.no_grad()
    def propose(self, committed, spec, sampling, gen):
        req = self.req
        seq = req.prompt_ids + list(committed)
        upto = len(seq) - 2
        if req.n_feat != upto + 1:
            raise RuntimeError(f"feature drafter out of sync: {req.n_feat} features for {len(seq)} tokens")
        req.forwards = 0
        if req.n_fed == 0:
            self._feed_prompt(seq, upto)
        new = seq[req.n_fed + 1 : upto + 2]  # token[p + 1] of each position p not yet fed
        # On the fast path chains and (single-head) dynamic trees are drafted on the device.
        on_device = req.fast_path and (spec.kind == "chain" or spec.kind == "dynamic" and self.cfg.flash == 1)
        if on_device and spec.kind == "chain":
            tokens, probs, q_rows = self._run_step(new, spec, sampling, gen)
            tree = DraftTree(tokens=[0] * spec.depth, parents=list(range(-1, spec.depth - 1)),
                             depths=list(range(1, spec.depth + 1)), draft_probs=[0.0] * spec.depth)
            prop = Proposal(tree, {d - 1: q_rows[d] for d in range(spec.depth)}, device_tokens=tokens,
                            device_probs=probs)
        elif on_device:
            prop = device_tree.to_proposal(self._run_step(new, spec, sampling, gen), spec)
        else:
            if new:
                self._run_step(new, NO_TREE, sampling, gen)
            prop = grow_tree(self._tree_expander(sampling), spec, not sampling.greedy, gen)
        prop.extras = {"drafter_forwards": req.forwards}
        if req.visual_map is not None:
            prop.extras["visual_map"] = req.visual_map
        return prop

    def _tree_expander(self, sampling: Sampling):
        """grow_tree's expand over the buffers: nodes are fed after the committed rows in the order
        they are expanded and see their ancestors (rows past the committed ones are never kept)."""
        net, req, buf, dev, kf = self.net, self.req, self.buf, self._dev, self.cfg.flash
        base = req.n_fed - 1  # RoPE position of the root entry
        heads: dict[int, torch.Tensor] = {-1: buf.root.clone()}
        fed: list[int] = []

        def anchor(pool: TreePool, i: int) -> tuple[int, int]:
            a, j = i, 0
            while a not in heads:
                a = pool.parents[a]
                j += 1
            return a, j

        def feed(pool: TreePool, order: list[int]) -> None:
            feats = []
            for n in order:
                a, j = anchor(pool, n)
                feats.append(heads[a][min(j, kf) - 1])
            toks = torch.tensor([pool.tokens[n] for n in order], device=dev)
            pos = torch.tensor([base + pool.depths[n] for n in order], device=dev)
            start, T = req.n_cache + len(fed), len(order)
            self._reserve(start + T)
            anc = tree_attention(pool.parents)[1:, 1:]
            allowed = torch.zeros(T, self.buf.cap, dtype=torch.bool)
            allowed[:, : req.n_cache] = True
            allowed[:, req.n_cache : start + T] = anc[torch.tensor(order)][:, torch.tensor(fed + order)]
            out = self._forward(self._inputs(toks, torch.stack(feats)), pos, torch.arange(start, start + T, device=dev),
                                None, allowed.to(dev))
            req.forwards += 1
            heads.update(zip(order, out))
            fed.extend(order)

        def expand(pool: TreePool, ids: list[int]) -> torch.Tensor:
            todo: set[int] = set()
            for i in ids:
                a, j = anchor(pool, i)
                n = i
                while j >= kf and n != a:  # the path since the anchor is fed once its heads are used up
                    todo.add(n)
                    n = pool.parents[n]
            if todo:
                feed(pool, sorted(todo, key=lambda n: (pool.depths[n], n)))
            rows = [heads[a][j] for a, j in (anchor(pool, i) for i in ids)]
            return draft_probs(net.logits(torch.stack(rows)), sampling)

        return expand


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
