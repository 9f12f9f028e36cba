"""The target's own attention, recomputed from its hidden states and KV cache (no extra forward).

Feature drafters need two things from the target's attention:
- DREAM: a per-layer *attention entropy* profile, to choose which intermediate layers the drafter's
  cross-attention reads (`entropy_profile` + `choose_layers`);
- top-k visual compression: how much attention each visual token receives (`visual_saliency`).

Both come from the same computation: the query of decoder layer i at some positions is rebuilt from
the layer's input (`hidden_states[i]`, which the engine already returns) with the layer's own
input norm, q projection and rotary embedding, and scored against the keys the target cached for
that layer (already rotated). This equals the eager attention probabilities of the target (a test
checks it against `output_attentions`) and works for 1-D RoPE (LLaVA/Llama) and M-RoPE (Qwen2-VL)
alike, because position ids go through the family adapter and the model's own `rotary_emb`.
Decoders it does not rebuild exactly (query norms, sliding windows, softcapping: Gemma3, Qwen3-VL,
GLM-4.1V, Cohere2, Mistral with a window) are refused with an InputError naming why
(`families.attention_recompute_problem`), never answered approximately.

Layer choice rule (documented, tested): normalised entropy H/log(#keys) averaged over heads and
query positions (text positions after the image); pick the `k` layers of lowest mean entropy among
the first ceil(frac * L) decoder layers (k=2, frac=0.4), plus the last decoder layer. The
lowest-entropy layer of all chosen ones in the early range is the intermediate-supervision layer.
"""
from __future__ import annotations

import math

import torch

from mmspec.errors import InputError
from mmspec.families import attention_recompute_problem


def text_model(model):
    """The decoder stack (has `.layers` and `.rotary_emb`) inside a VLM."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is None and hasattr(model, "get_decoder"):
        lm = model.get_decoder()
    if lm is None or not hasattr(lm, "layers"):
        raise TypeError(f"cannot find the text decoder of {type(model).__name__}")
    return lm


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@torch.no_grad()
def attention_probs(model, layer: int, h_in: torch.Tensor, position_ids: torch.Tensor, keys: torch.Tensor,
                    allowed: torch.Tensor) -> torch.Tensor:
    """Attention of decoder layer `layer` for queries from its input `h_in` [B, Tq, H].

    position_ids: what the model's rotary embedding takes for these queries ([B, Tq], or [3, B, Tq]);
    keys: the layer's cached keys [B, kv_heads, Tk, head_dim]; allowed [B, Tq, Tk] bool.
    Returns probabilities [B, heads, Tq, Tk] (float32).
    """
    problem = attention_recompute_problem(model.config)
    if problem:
        raise InputError(f"cannot recompute the attention of {model.config.model_type}: {problem}")
    lm = text_model(model)
    blk = lm.layers[layer]
    attn = blk.self_attn
    x = blk.input_layernorm(h_in.to(next(blk.parameters()).dtype))
    q = attn.q_proj(x)
    B, Tq, _ = q.shape
    hd = keys.shape[-1]
    q = q.view(B, Tq, -1, hd).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, position_ids)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = (q * cos + _rotate_half(q) * sin).float()
    k = keys.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = getattr(attn, "scaling", hd**-0.5)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None].to(scores.device), float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0)


def num_layers(model) -> int:
    return len(text_model(model).layers)


@torch.no_grad()
def entropy_profile(model, hidden_states, keys_by_layer, position_ids: torch.Tensor, query_mask: torch.Tensor) -> list[float]:
    """Mean normalised attention entropy per decoder layer.

    hidden_states: the target's `hidden_states` tuple (entry i = input of layer i), each [B, T, H];
    keys_by_layer: cached keys per layer [B, kv, T, hd]; position_ids as the model takes them for
    positions 0..T-1; query_mask [B, T] bool: which positions' attention rows count.
    """
    B, T = query_mask.shape
    dev = hidden_states[0].device
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    allowed = causal[None].expand(B, T, T)
    n_keys = torch.arange(1, T + 1, device=dev, dtype=torch.float32)
    qm = query_mask.to(dev)
    out = []
    for i in range(len(keys_by_layer)):
        p = attention_probs(model, i, hidden_states[i], position_ids, keys_by_layer[i], allowed)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [B, heads, T]
        norm = ent / n_keys.clamp_min(2).log()[None, None]
        per_tok = norm.mean(1)  # over heads
        out.append(float(per_tok[qm].mean()) if qm.any() else float("nan"))
    return out


def choose_layers(profile: list[float], k: int = 2, frac: float = 0.4) -> tuple[list[int], int]:
    """(chosen decoder layers, sorted; the intermediate-supervision layer). See the module docstring."""
    L = len(profile)
    early = max(1, math.ceil(frac * L))
    ranked = sorted(range(early), key=lambda i: (profile[i], i))
    pick = ranked[: min(k, early)]
    chosen = sorted(set(pick) | {L - 1})
    return chosen, ranked[0]


@torch.no_grad()
def visual_saliency(model, h_last_in: torch.Tensor, last_keys: torch.Tensor, position_ids: torch.Tensor,
                    query_pos: torch.Tensor, query_mask: torch.Tensor, vis_start: torch.Tensor, n_vis: int) -> torch.Tensor:
    """Attention each visual token receives in the target's last layer, averaged over heads and over
    the query positions in `query_mask` (the prompt's text after the image).

    h_last_in [B, Tq, H]: input of the last decoder layer at the query positions (`hidden_states[-2]`);
    position_ids: the rotary position ids of those queries; query_pos [B, Tq]: their sequence indices;
    last_keys [B, kv, Tk, hd]; vis_start [B]: first visual index; returns [B, n_vis] (rows sum to <= 1).
    """
    L = num_layers(model)
    B, Tq = query_pos.shape
    Tk = last_keys.shape[2]
    dev = last_keys.device
    allowed = torch.arange(Tk, device=dev)[None, None, :] <= query_pos.to(dev)[:, :, None]
    p = attention_probs(model, L - 1, h_last_in, position_ids, last_keys, allowed).mean(1)  # [B, Tq, Tk]
    qm = query_mask.to(dev).float()
    recv = (p * qm[:, :, None]).sum(1) / qm.sum(1, keepdim=True).clamp_min(1)  # [B, Tk]
    idx = vis_start.to(dev)[:, None] + torch.arange(n_vis, device=dev)[None]
    return recv.gather(1, idx.clamp(max=Tk - 1))
