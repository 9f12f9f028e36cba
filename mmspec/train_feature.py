"""Train feature-level drafters (EAGLE family, see mmspec.feature_drafter) for a target VLM.

    python -m mmspec.train_feature --target assets/models/mmspec-target --variant all \
        --out assets/models --device cuda --time-budget-min 7.5
    python -m mmspec.train_feature --target DIR --variant eagle --smoke --out /tmp/x   # CPU, < 60 s

Self-distillation by teacher forcing: synthetic prompts and ground-truth answers from
`mmspec.world.sample_example` are run through the target once per batch (bf16, hidden states,
KV cache); the drafters learn the target's own next-token distributions (KL) and its last-layer
features (SmoothL1) at every answer position. The target was trained on these answers, so they
are close to what it generates; where it would say something else, the KL still teaches the
target's distribution, not the ground truth. One target forward feeds every variant: all drafters
train side by side on the same batches, so N variants cost one data pipeline and one target.

Per variant: EAGLE-3 training-time test (unroll the drafter `unroll` steps on its own predicted
features, diagonal attention masks, loss weight 0.8**j), plus DREAM's intermediate supervision,
MSD's two-stage schedule (text-only samples, then a share of multimodal samples rising from 5% to
95%), FLASH's future-head losses. Each variant is saved to OUT/mmspec-feat-<variant>/ with
model.safetensors (fp16, the drafter's own weights only), mmspec_drafter.json and a README.md card.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmspec import entropy
from mmspec.errors import InputError
from mmspec.feature_drafter import (
    QUERY, TEXT, VARIANTS, FeatNet, FeatureDrafter, Shared, image_grid, load_feature_drafter, make_config,
    plan_entries, rms, save_feature_drafter, size_report,
)
from mmspec.train import Schedule

TEXT_FRAC = 0.1  # share of image questions asked without their image (MSD's text-only stage uses them)
SEED_BASE = 300_000_000  # training seeds (< 10**9); held-out evaluation uses world.held_out_seeds


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------
# Data


class WorldData(torch.utils.data.Dataset):
    def __init__(self, target, seeds, max_answer: int, text_frac: float = TEXT_FRAC):
        self.proc, self.family, self.tok = target.processor, target.family, target.tokenizer
        self.seeds, self.max_answer, self.text_frac = list(seeds), max_answer, text_frac

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, i):
        from mmspec.world import sample_example

        seed = self.seeds[i]
        img, qa, _ = sample_example(seed)
        # Text-only questions go without the image half the time (as the target was trained); any
        # other question goes without it with probability text_frac (MSD's text-only stage uses these).
        drop = 0.5 if not qa.needs_image else self.text_frac
        with_image = random.Random(seed ^ 0xFEA7).random() >= drop
        inputs = self.family.prefill_inputs(self.proc, img if with_image else None, qa.prompt)
        prompt = inputs["input_ids"][0].tolist()
        eos = self.tok.eos_token or ""
        ans = self.tok(" " + qa.answer + eos, add_special_tokens=False)["input_ids"][: self.max_answer]
        return {"ids": prompt + ans, "P": len(prompt), "pv": inputs.get("pixel_values") if with_image else None,
                "with_image": with_image, "size": img.size, "kind": qa.kind}


class Collate:
    def __init__(self, pad_id: int):
        self.pad = pad_id

    def __call__(self, items):
        T = max(len(it["ids"]) for it in items)
        T = (T + 31) // 32 * 32  # few distinct shapes
        ids = torch.full((len(items), T), self.pad, dtype=torch.long)
        att = torch.zeros((len(items), T), dtype=torch.long)
        for b, it in enumerate(items):
            ids[b, : len(it["ids"])] = torch.tensor(it["ids"])
            att[b, : len(it["ids"])] = 1
        pvs = [it["pv"] for it in items if it["pv"] is not None]
        return {
            "input_ids": ids, "attention_mask": att,
            "pixel_values": torch.cat(pvs) if pvs else None,
            "P": torch.tensor([it["P"] for it in items]), "len": torch.tensor([len(it["ids"]) for it in items]),
            "with_image": torch.tensor([it["with_image"] for it in items]),
            "sizes": [it["size"] for it in items], "kinds": [it["kind"] for it in items],
        }


def loader(target, seeds, batch, workers, max_answer, shuffle=False):
    ds = WorldData(target, seeds, max_answer)
    kw = dict(prefetch_factor=4, persistent_workers=True) if workers > 0 else {}
    pad = target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=workers,
                                       collate_fn=Collate(pad), drop_last=False, **kw)


# ------------------------------------------------------------------------------------------------
# One target forward, shared by every variant


class SharedBatch:
    """What one target forward gives every variant: hidden states, log-probs, cache, layout."""


@torch.no_grad()
def target_pass(target, batch, need: dict) -> SharedBatch:
    """Run the target once; keep what the variants need (hidden states, distributions, cache, saliency)."""
    model, dev = target.model, target.device
    ids = batch["input_ids"].to(dev)
    att = batch["attention_mask"].to(dev)
    pv = batch["pixel_values"]
    kw = {}
    if pv is not None:
        kw["pixel_values"] = pv.to(dev, target.dtype)
    use_cache = need["cache"]
    out = model(input_ids=ids, attention_mask=att, output_hidden_states=True, use_cache=use_cache, **kw)
    sb = SharedBatch()
    B, T = ids.shape
    sb.B, sb.T, sb.dev = B, T, dev
    sb.hs = {i: out.hidden_states[i] for i in need["layers"]}
    sb.P, sb.len = batch["P"].to(dev), batch["len"].to(dev)
    sb.P_np, sb.len_np = batch["P"].numpy(), batch["len"].numpy()
    sb.with_image_np = batch["with_image"].numpy()
    image_id = getattr(model.config, "image_token_id", None)
    sb.spans = []
    ids_cpu = batch["input_ids"]
    for b in range(B):
        row = (ids_cpu[b] == image_id).nonzero().flatten() if image_id is not None else torch.zeros(0)
        sb.spans.append((int(row[0]), len(row)) if len(row) else None)
    sb.grids = [image_grid(s[1], batch["sizes"][b]) if s else None for b, s in enumerate(sb.spans)]
    # Target log-probs at every position q in [P, len - 2] (q predicts token q + 1 of the answer),
    # flattened sample-major; sample b's rows start at off_np[b].
    pos = torch.arange(T)[None]
    sel = (pos >= batch["P"][:, None]) & (pos <= batch["len"][:, None] - 2)
    counts = sel.sum(1).numpy()
    sb.off_np = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    sb.tlogp = torch.log_softmax(out.logits[sel.to(dev)].float(), -1)
    # Which drafter positions p are visual (token p + 1 is an image token), and the image embeddings.
    v0 = np.array([s[0] if s else -10 for s in sb.spans])
    nv = np.array([s[1] if s else 0 for s in sb.spans])
    p = np.arange(T - 1)[None]
    sb.vis = torch.from_numpy((p + 1 >= v0[:, None]) & (p + 1 < (v0 + nv)[:, None])).to(dev)
    n = int(nv.max()) if len(nv) else 0
    hs0 = out.hidden_states[0]
    if n:
        idx = torch.from_numpy(np.clip(v0, 0, None)[:, None] + np.arange(n)[None]).clamp(max=T - 1).to(dev)
        sb.img_emb = hs0.gather(1, idx[..., None].expand(-1, -1, hs0.shape[-1]))
    else:
        sb.img_emb = torch.zeros(B, 1, hs0.shape[-1], device=dev, dtype=hs0.dtype)
    sb.cache = out.past_key_values if use_cache else None
    sb.saliency_np = None
    if need["saliency"]:
        sal = batch_saliency(target, sb, out.hidden_states, out.past_key_values)
        sb.saliency_np = sal.float().cpu().numpy() if sal is not None else None
    sb.profile = None
    if need.get("profile"):
        sb.profile = batch_entropy(target, sb, out.hidden_states, out.past_key_values)
    return sb


def _post_image_queries(sb, prompt_only: bool):
    """[B, Tq] positions (and mask) of text after the image: the prompt's, or prompt + answer."""
    rows = []
    for b in range(sb.B):
        s = sb.spans[b]
        lo = s[0] + s[1] if s else 1
        hi = int(sb.P_np[b]) if prompt_only else int(sb.len_np[b])
        rows.append(list(range(lo, max(hi, lo + 1))))
    Tq = max(len(r) for r in rows)
    q = torch.zeros(sb.B, Tq, dtype=torch.long)
    m = torch.zeros(sb.B, Tq, dtype=torch.bool)
    for b, r in enumerate(rows):
        q[b, : len(r)] = torch.tensor(r)
        m[b, : len(r)] = True
    return q, m


def batch_saliency(target, sb, hs, cache):
    """[B, n_vis] attention received by each visual token in the target's last layer (image samples)."""
    L = entropy.num_layers(target.model)
    q, m = _post_image_queries(sb, prompt_only=True)
    dev = target.device
    q, m = q.to(dev), m.to(dev)
    h_in = hs[L - 1].gather(1, q[..., None].expand(-1, -1, hs[L - 1].shape[-1]))
    v0 = torch.tensor([s[0] if s else 0 for s in sb.spans], device=dev)
    n = max((s[1] for s in sb.spans if s), default=0)
    if n == 0:
        return None
    return entropy.visual_saliency(target.model, h_in, cache.layers[L - 1].keys, q, q, m, v0, n)


def batch_entropy(target, sb, hs, cache) -> list[float]:
    q, m = _post_image_queries(sb, prompt_only=False)
    T = sb.T
    qmask = torch.zeros(sb.B, T, dtype=torch.bool)
    for b in range(sb.B):
        qmask[b, q[b][m[b]]] = True
    pos = torch.arange(T, device=target.device)[None].expand(sb.B, -1)
    keys = [layer.keys for layer in cache.layers]
    return entropy.entropy_profile(target.model, hs, keys, pos, qmask)


# ------------------------------------------------------------------------------------------------
# Per-variant training forward


def build_plan(cfg, sb, dev):
    """Entries of every sample (mmspec.feature_drafter.plan_entries, the inference code) as tensors
    (on `dev`) plus their numpy copies (for host-side index building without device syncs)."""
    B = sb.B
    per = []
    for b in range(B):
        N = int(sb.len_np[b]) - 1
        span = sb.spans[b]
        sal = None
        if cfg.compress == "topk" and span is not None and sb.saliency_np is not None:
            sal = sb.saliency_np[b, : span[1]].tolist()
        own_from = int(sb.P_np[b]) - 1 if cfg.aasd else 0
        entries, _ = plan_entries(N, span, sb.grids[b], cfg, sal, own_from)
        per.append(entries)
    Te = (max(len(e) for e in per) + 31) // 32 * 32  # padded: few distinct shapes
    src = np.zeros((B, Te), dtype=np.int64)
    rope = np.zeros((B, Te), dtype=np.int64)
    kind = np.full((B, Te), -1, dtype=np.int64)
    slot = np.zeros((B, Te), dtype=np.int64)
    post = np.zeros((B, Te), dtype=bool)
    pool_rows, pool_cols, pool_w = [], [], []
    pooled = cfg.compress == "pool"
    for b, entries in enumerate(per):
        for e, en in enumerate(entries):
            src[b, e], rope[b, e], kind[b, e], slot[b, e], post[b, e] = en.src, en.rope, en.kind, max(en.slot, 0), en.post
            if pooled:
                w = 1.0 / len(en.members)
                for m in en.members:
                    pool_rows.append(b * Te + e)
                    pool_cols.append(m)
                    pool_w.append(w)
    t = lambda a: torch.from_numpy(a).to(dev, non_blocking=True)  # noqa: E731
    plan = {"src": t(src), "rope": t(rope), "kind": t(kind), "slot": t(slot), "post": t(post), "Te": Te,
            "np": {"src": src, "kind": kind}}
    if pooled:
        M = torch.zeros(B * Te, sb.T - 1, device=dev)
        M[t(np.array(pool_rows)), t(np.array(pool_cols))] = t(np.array(pool_w, dtype=np.float32))
        plan["M"] = M.view(B, Te, sb.T - 1)
    return plan


def _gather(x, idx):
    """x [B, N, ...], idx [B, T] -> [B, T, ...]"""
    shape = idx.shape + x.shape[2:]
    flat = idx.reshape(idx.shape[0], -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, flat).reshape(shape)


def loss_index(plan, sb, R: np.ndarray | None, rv: np.ndarray | None, h: int):
    """Host-side indices of the loss terms of rows R ([B, Tq] entry indices; None = all entries)
    with head h: entry e (text, src p >= P - 1) predicts position q = p + 1 + h (q <= len - 2).
    Returns (flat row in [B, Tq], tlogp row, flat position in [B, T], sample) as int64 arrays."""
    src, kind = plan["np"]["src"], plan["np"]["kind"]
    if R is not None:
        src, kind = np.take_along_axis(src, R, 1), np.where(rv, np.take_along_axis(kind, R, 1), -1)
    P, Ln = sb.P_np[:, None], sb.len_np[:, None]
    q = src + 1 + h
    ok = (kind == TEXT) & (src >= P - 1) & (q <= Ln - 2)
    b, e = np.nonzero(ok)
    qq = q[b, e]
    Tq = src.shape[1]
    return b * Tq + e, sb.off_np[b] + (qq - sb.P_np[b]), b * sb.T + qq, b


def variant_loss(net: FeatNet, sb, progress: float, train: bool = True, capture: dict | None = None):
    """Loss and metrics of one drafter on one shared batch (EAGLE-3 training-time test).

    No host-device synchronisation: loss positions are indexed from host-side plans.
    capture: if a dict, receives the plan and, per unroll step j, (entry indices, features [B, Tq, k, H]).
    Returns (loss tensor, dict of 0-dim tensors)."""
    c = net.cfg
    dev = sb.dev
    plan = build_plan(c, sb, dev)
    B, Te, T = sb.B, plan["Te"], sb.T
    L, H = c.L, c.hidden
    emb_next = sb.hs[0][:, 1:]  # [B, N, H] input embedding of token p + 1
    N = emb_next.shape[1]
    feat = net.feature_in({i: h[:, :N] for i, h in sb.hs.items()})
    xp = net.input_x(emb_next, feat, sb.vis)
    src, kind, post = plan["src"], plan["kind"], plan["post"]
    valid = kind >= 0
    x0 = torch.bmm(plan["M"].to(xp.dtype), xp) if "M" in plan else _gather(xp, src)
    g = None
    if net.adaptor is not None:
        ad = net.adaptor(sb.img_emb)  # [B, nq, H]
        if c.compress == "queries":
            x0 = torch.where((kind == QUERY)[..., None], _gather(ad, plan["slot"]).to(x0.dtype), x0)
        if c.global_image:
            g = ad[:, -1:]
            x0 = torch.where(post[..., None], net.fuse_global(x0, g.to(x0.dtype)), x0)
    emb_e = _gather(emb_next, src)
    rope = plan["rope"]
    eidx = torch.arange(Te, device=dev)
    is_text = kind == TEXT
    J = max(1, c.unroll)
    # Unrolled steps j >= 1 only matter where losses are: per sample, the entries from J before its
    # first loss entry to its last entry (rows R, padded to a common length; rv = real rows).
    knp, snp = plan["np"]["kind"], plan["np"]["src"]
    okn = (knp == TEXT) & (snp >= sb.P_np[:, None] - 1)
    n_ent = (knp >= 0).sum(1)
    first = np.where(okn.any(1), okn.argmax(1), n_ent)
    start = np.maximum(0, first - J)
    Tq1 = int(max(1, (n_ent - start).max()))
    Tq1 = min(Te, (Tq1 + 31) // 32 * 32)
    R_np = start[:, None] + np.arange(Tq1)[None]
    rv_np = R_np < n_ent[:, None]
    R_np = np.minimum(R_np, Te - 1)
    R = torch.from_numpy(R_np).to(dev, non_blocking=True)
    rv = torch.from_numpy(rv_np).to(dev, non_blocking=True)

    aasd = None
    if c.aasd:
        layer = sb.cache.layers[c.aasd_layer % L]
        Km, Vm = net.aasd_memory(layer.keys, layer.values)
        mpos = torch.arange(Km.shape[2], device=dev)
        aasd = (Km, Vm, (mpos[None, None, :] <= sb.P[:, None, None] - 2).expand(B, Te, -1))
    cross_kv = None
    if c.dream:
        feats = torch.stack([sb.hs[c.hs_index(i)] for i in c.dream_layers], 1)  # [B, nL, T, H]
        Kc, Vc = net.cross.memory(feats)
        cross_kv = (Kc, Vc, torch.arange(T, device=dev).repeat(len(c.dream_layers)))

    def cross_for(src_rows, j):
        if cross_kv is None:
            return None
        Kc, Vc, cpos = cross_kv
        return (Kc, Vc, cpos[None, None, :] <= (src_rows - j)[..., None])

    w_np = np.ones(B, dtype=np.float32)  # MSD two-stage sample weights
    if c.two_stage and train:
        img = sb.with_image_np.astype(np.float32)
        if progress < 0.5:
            w_np = 1.0 - img
        else:
            share = 0.05 + 0.9 * min(1.0, (progress - 0.5) / 0.5)
            w_np = img * share + (1 - img) * (1 - share)

    total = torch.zeros((), device=dev)
    stats: dict[str, torch.Tensor] = {}
    fj_prev, f0, kv_steps = None, None, []
    hs_top = sb.hs[L].reshape(B * T, H)
    qi = torch.arange(Tq1, device=dev)
    for j in range(J):
        if j == 0:
            x, past, rope_j, src_j = x0, None, rope, src
            mask = ((eidx[None, :] <= eidx[:, None])[None] & valid[:, None, :]).expand(B, -1, -1)
            rows_idx = eidx[None].expand(B, -1)
        else:
            rows_idx = R
            if c.flash > 1:
                fin = _gather(f0[:, :, min(j, c.flash) - 1], (R - j).clamp_min(0))
            elif j == 1:
                fin = _gather(f0[:, :, 0], (R - 1).clamp_min(0))
            else:
                fin = torch.cat([_gather(f0[:, :, 0], (R[:, :1] - 1).clamp_min(0)), fj_prev[:, :-1]], 1)
            xj = net.input_x(_gather(emb_e, R), fin)
            if g is not None:
                xj = torch.where(_gather(post, R)[..., None], net.fuse_global(xj, g.to(xj.dtype)), xj)
            x = torch.where((_gather(is_text, R) & rv)[..., None], xj.to(x0.dtype), _gather(x0, R))
            rope_j, src_j = _gather(rope, R), _gather(src, R)
            past = [(torch.cat([s[li][0] for s in kv_steps], 2), torch.cat([s[li][1] for s in kv_steps], 2))
                    for li in range(len(net.layers))]
            parts = [(eidx[None, None, :] <= (R - j)[:, :, None]) & valid[:, None, :]]
            for i in range(1, j + 1):
                parts.append((qi[None, :] == (qi[:, None] - j + i))[None].expand(B, -1, -1))
            mask = torch.cat(parts, -1)
        am = None
        if aasd is not None:
            am = (aasd[0], aasd[1], aasd[2][:, :1].expand(-1, x.shape[1], -1))
        r, new, xo = net.run(x, rope_j, past, mask, am, cross_for(src_j, j))
        kv_steps.append(new)
        fh = net.head_feats(r)  # [B, Tq, k, H]
        Tq = fh.shape[1]
        if capture is not None:
            capture["plan"] = plan
            capture[j] = (rows_idx, fh.detach())
        if j == 0:
            f0 = fh
        else:
            fj_prev = fh[:, :, 0]
        for h in range(c.flash):
            fi, ti, pi, bi = loss_index(plan, sb, None if j == 0 else R_np, None if j == 0 else rv_np, h)
            wsum = float(w_np[bi].sum())
            if len(fi) == 0 or wsum <= 0:
                continue
            to = lambda a: torch.from_numpy(a).to(dev, non_blocking=True)  # noqa: E731
            fi_t, ti_t, pi_t = to(fi), to(ti), to(pi)
            wt = to(w_np[bi] / wsum)
            fpred = fh[:, :, h].reshape(B * Tq, H).index_select(0, fi_t)
            tl = sb.tlogp.index_select(0, ti_t)
            sl = torch.log_softmax(net.logits(fpred).float(), -1)
            kl = (tl.exp() * (tl - sl)).sum(-1)
            loss = c.w_kl * kl
            if c.w_feat > 0:
                ftgt = hs_top.index_select(0, pi_t)
                loss = loss + c.w_feat * F.smooth_l1_loss(fpred.float(), ftgt.float(), reduction="none").mean(-1)
            if j == 0 and h == 0 and c.dream and c.dream_super >= 0:
                itgt = sb.hs[c.hs_index(c.dream_super)].reshape(B * T, H).index_select(0, pi_t)
                xsel = xo.reshape(B * Tq, H).index_select(0, fi_t)
                loss = loss + c.w_inter * F.smooth_l1_loss(rms(xsel).float(), rms(itgt).float(), reduction="none").mean(-1)
            total = total + (0.8**j) * (1.0 if h == 0 else 0.5) * (loss * wt).sum()
            agree = (sl.argmax(-1) == tl.argmax(-1)).float().mean().detach()
            if h == 0:
                stats[f"acc{j}"] = agree
                stats[f"kl{j}"] = kl.detach().mean()
            elif j == 0:
                stats[f"head{h}_acc"] = agree
    stats["loss"] = total.detach()
    return total, stats


# ------------------------------------------------------------------------------------------------
# Loop




def hardware(device) -> str:
    if device.type == "cuda":
        return f"1x {torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def expected_accept(accs: list[float]) -> float:
    """Expected accepted drafts of a chain whose depth-d acceptance is accs[d] (given the path so far)."""
    tot, run = 0.0, 1.0
    for a in accs:
        run *= a
        tot += run
    return tot


def evaluate(nets, target, batches, need):
    out = {}
    agg: dict[str, dict[str, list[float]]] = {v: {} for v in nets}
    for batch in batches:
        sb = target_pass(target, batch, need)
        for v, net in nets.items():
            net.eval()
            with torch.no_grad(), autocast(target.device):
                _, st = variant_loss(net, sb, 1.0, train=False)
            for k, x in st.items():
                agg[v].setdefault(k, []).append(float(x))
            net.train()
    for v, d in agg.items():
        out[v] = {k: round(sum(x) / len(x), 4) for k, x in d.items()}
        accs = [out[v][f"acc{j}"] for j in range(nets[v].cfg.unroll) if f"acc{j}" in out[v]]
        out[v]["chain_accept"] = round(expected_accept(accs), 3)
    return out


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def engine_eval(drafter, target, seeds, tree: str, max_new: int, vanilla_cache: dict) -> dict:
    from mmspec.engine import DecodeConfig, generate
    from mmspec.world import sample_example

    taus, acc, same, walls, vwalls = [], [], True, 0.0, 0.0
    img, qa, _ = sample_example(seeds[0], kind="describe")
    generate(target, drafter, img, qa.prompt, DecodeConfig(max_new_tokens=8, tree=tree))  # warm-up, untimed
    if "_warm" not in vanilla_cache:
        generate(target, None, img, qa.prompt, DecodeConfig(max_new_tokens=8))
        vanilla_cache["_warm"] = True
    for s in seeds:
        img, qa, _ = sample_example(s, kind="describe")  # long answers: what speculation is for
        if s not in vanilla_cache:
            vanilla_cache[s] = generate(target, None, img, qa.prompt, DecodeConfig(max_new_tokens=max_new))
        ref = vanilla_cache[s]
        g = generate(target, drafter, img, qa.prompt, DecodeConfig(max_new_tokens=max_new, tree=tree))
        same &= g.token_ids == ref.token_ids
        taus.append(g.stats.tau)
        acc.append(g.stats.mean_accepted)
        walls += g.stats.wall_s
        vwalls += ref.stats.wall_s
    return {"tree": tree, "prompts": len(seeds), "max_new_tokens": max_new, "tau": round(sum(taus) / len(taus), 3),
            "mean_accepted": round(sum(acc) / len(acc), 3), "lossless_check": bool(same),
            "speedup_vs_vanilla": round(vwalls / walls, 3) if walls else None}


VARIANT_NOTES = {
    "eagle": "EAGLE: fc(concat(token embedding, target last-layer feature)) -> one decoder layer -> next feature, "
             "decoded by the target's LM head; autoregressive over the draft tree.",
    "eagle3": "EAGLE-3: low/mid/high target features fused (3H -> H, initialised to the top feature), no feature loss.",
    "dream": "DREAM: a gated (tanh, init 0) cross-attention block with RMSNorm on q/k into target features of the layers "
             "chosen by attention entropy; its output is also regressed onto the lowest-entropy layer.",
    "pool2": "Visual compression: the drafter's view of the image span is average-pooled 2x2 (196 -> 49 entries).",
    "pool4": "Visual compression: the drafter's view of the image span is average-pooled 4x4 (196 -> 16 entries).",
    "topk": "Visual compression: keep the 25% visual tokens that receive the most attention from the target's last "
            "layer (queries = the prompt's text after the image), drop the rest.",
    "vispec": "ViSpec: 2 learnable queries cross-attend over the image embeddings; one replaces the image span (at its "
              "last position), the other is a global image vector fused into every later text entry "
              "(fc(concat(h, g)), identity on h, zero on g at init).",
    "msd": "MSD: visual entries take the raw projector embeddings through their own linear path (no target feature); "
           "trained text-only first, then with a rising share of multimodal samples.",
    "aasd": "AASD: no drafter entries for the prompt: the layer attends to the target's own last-layer KV cache of the "
            "prompt + image through a learned projection (head mixing for keys, linear map for values).",
    "flash": "FLASH: 16 learnable latent queries replace the image span (196 -> 16); a semi-autoregressive head "
             "predicts 3 future features per drafter forward, so the drafter runs once per 3 tree levels.",
    "dream_topk": "DREAM with the paper's own visual compression: keep the 75% most-attended visual tokens.",
}


def write_card(path: Path, v: str, net: FeatNet, info: dict) -> None:
    c = net.cfg
    q = info.get("quality", {})
    ev = q.get("heldout", {})
    en = q.get("engine")
    lines = [
        f"# mmspec-feat-{v}",
        "",
        f"Feature-level drafter (`mmspec.feature_drafter`, variant `{v}`) for `{info['target_name']}`. "
        "Load with `mmspec.load_drafter(path, target)`; the target's embeddings, final norm and LM head are shared "
        "at load time (not stored here).",
        "",
        "## Architecture",
        "",
        f"- {info['params'] / 1e6:.2f}M parameters ({info['size_mb_fp16']} MB in fp16), "
        f"{c.n_layers} decoder layer(s) of width {c.hidden}, {c.heads} heads ({c.kv_heads} KV heads).",
        f"- Options: `{json.dumps(info['options'])}`.",
        f"- Idea: {VARIANT_NOTES.get(v, '')}",
        f"- Reads target hidden states {list(c.target_layers())} (0 = embeddings, {c.L} = last layer).",
        f"- Target attention-entropy profile (normalised, per decoder layer): {[round(x, 3) for x in info['entropy_profile']]}; "
        f"chosen layers {info['chosen_layers']} (rule: the 2 lowest-entropy layers among the first 40%, plus the last)"
        + ("; used by the DREAM cross-attention." if c.dream else "; not used by this variant."),
        "",
        "## Training",
        "",
        f"- Self-distillation by teacher forcing: synthetic world prompts (`mmspec.world.sample_example`, "
        f"{int(TEXT_FRAC * 100)}% of image questions and half of the text-only ones asked without the image) with their "
        "ground-truth answers, run through the target; "
        "targets = the target's own next-token distributions (KL) and last-layer features (SmoothL1).",
        f"- Loss: {c.w_kl} x KL + {c.w_feat} x SmoothL1(feature)"
        + (f" + {c.w_inter} x SmoothL1(cross block -> layer {c.dream_super})" if c.dream else "")
        + f"; training-time test over {c.unroll} unrolled steps (weights 0.8^j)"
        + (f"; {c.flash} future heads (weight 0.5 beyond the first)" if c.flash > 1 else "")
        + ("; MSD schedule: text-only samples for the first half, then the multimodal share rises 5% -> 95%" if c.two_stage else "")
        + ".",
        f"- {info['steps']} steps x batch {info['batch']} ({info['samples']} samples), AdamW lr {info['lr']} "
        f"(warm-up, cosine), bf16 autocast on GPU; all variants trained together from shared target forwards "
        f"in {info['train_seconds']:.0f} s (whole run {info['run_seconds']:.0f} s) on {info['hardware']}.",
        "",
        "## Measured quality (held-out prompts)",
        "",
        f"- Top-1 agreement with the target, teacher-forced, by draft depth (training-time-test unroll): "
        + ", ".join(f"depth {j + 1}: {100 * ev[f'acc{j}']:.1f}%" for j in range(c.unroll) if f"acc{j}" in ev)
        + f"; implied mean accepted length of a chain of {c.unroll}: {ev.get('chain_accept', 'n/a')}.",
    ]
    if en and "error" in en:
        lines.append(f"- End-to-end check failed: {en['error']}")
    elif en:
        lines.append(
            f"- End to end with the engine (greedy, `{en['tree']}`, {en['prompts']} held-out describe prompts, {en['max_new_tokens']} new tokens): "
            f"tau = {en['tau']} tokens per target forward ({en['mean_accepted']} accepted drafts), "
            f"output identical to vanilla: {en['lossless_check']}, wall-clock speed-up {en['speedup_vs_vanilla']}x "
            f"on {info['hardware']}."
        )
    path.joinpath("README.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmspec.train_feature", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="target directory (default: the embedded assets/models/mmspec-target)")
    ap.add_argument("--variant", action="append", default=None, help=f"one of {', '.join(VARIANTS)} or 'all'; repeatable")
    ap.add_argument("--out", default="assets/models")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None, help="planned steps (default 1200; --smoke: 30)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-answer", type=int, default=160)
    ap.add_argument("--time-budget-min", type=float, default=None, help="whole run, evaluation and saving included")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-batches", type=int, default=2)
    ap.add_argument("--engine-eval", type=int, default=2, help="held-out prompts decoded with the engine per variant (0 = skip)")
    ap.add_argument("--engine-tree", default="dynamic:24,5,4")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: few steps, small batches")
    ap.add_argument("--profile", action="store_true", help="synchronise and report time per phase and variant")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    from tqdm import tqdm

    from mmspec.load import load_target
    from mmspec.world import held_out_seeds

    args = parse_args(argv)
    t_run = time.time()
    # Shapes change every batch: let the caching allocator grow segments instead of fragmenting.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    variants = []
    for v in args.variant or ["eagle"]:
        for name in (list(VARIANTS) if v == "all" else v.split(",")):
            if name not in VARIANTS:
                raise InputError(f"unknown variant {name!r}: use {', '.join(VARIANTS)} or all")
            if name not in variants:
                variants.append(name)
    if args.smoke:
        args.steps = args.steps or 30
        args.batch = min(args.batch, 6)
        args.max_answer = min(args.max_answer, 24)
        args.eval_every = 10
        args.eval_batches = 1
        args.engine_eval = min(args.engine_eval, 1)
        args.device = args.device or "cpu"
        args.lr = max(args.lr, 3e-3)
        torch.set_num_threads(1)  # tiny tensors: threads only contend
    args.steps = args.steps or 1200
    target = load_target(args.target, args.device)
    if target.family.name != "llava":
        raise InputError("train_feature supports 1-D RoPE targets (LLaVA family); inference works for all families")
    dev = target.device
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        try:  # per-shape plan building of cuDNN attention does not pay off with ever-changing shapes
            torch.backends.cuda.enable_cudnn_sdp(False)
        except AttributeError:
            pass
    torch.manual_seed(args.seed)
    workers = args.workers if args.workers is not None else (0 if args.smoke or dev.type == "cpu" else min(14, (os.cpu_count() or 2) - 2))
    log(f"[feat] target {target.name} on {dev} ({target.dtype}); variants {variants}; {hardware(dev)}")

    eval_n = args.batch * args.eval_batches
    ev_loader = loader(target, held_out_seeds(eval_n, offset=500_000), args.batch, 0, args.max_answer)
    eval_batches = list(ev_loader)
    # Attention-entropy calibration (DREAM layer choice) on the first held-out batch.
    t0 = time.time()
    sb = target_pass(target, eval_batches[0], {"layers": (), "cache": True, "saliency": False, "profile": True})
    profile = sb.profile
    del sb
    choice = entropy.choose_layers(profile)
    log(f"[feat] entropy profile {[round(x, 3) for x in profile]} -> chosen layers {choice[0]}, supervised {choice[1]} "
        f"({time.time() - t0:.1f}s)")

    nets, opts = {}, {}
    smoke_over = {"unroll": 2} if args.smoke else {}
    for v in variants:
        cfg = make_config(v, target.model, choice, **smoke_over)
        net = FeatNet(cfg, Shared(target.model)).to(dev).train()
        nets[v] = net
        opts[v] = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                    **({"fused": True} if dev.type == "cuda" else {}))
        log(f"[feat] {v}: {size_report(net)} options {cfg.options()}")
    need = {
        "layers": tuple(sorted(set().union(*[n.target_layers for n in nets.values()]))),
        "cache": any(n.cfg.aasd for n in nets.values()),
        "saliency": any(n.cfg.compress == "topk" for n in nets.values()),
    }
    need["cache"] = need["cache"] or need["saliency"]

    before = evaluate(nets, target, eval_batches, need)
    log("[feat] before training: " + "; ".join(f"{v} acc0 {before[v].get('acc0')} loss {before[v]['loss']}" for v in variants))

    total = args.steps
    sched = Schedule(total, warmup=max(3, min(30, total // 10)), floor=0.05)
    seeds = [SEED_BASE + args.seed * 10_000_000 + i for i in range(total * args.batch * 2)]
    tr_loader = loader(target, seeds, args.batch, workers, args.max_answer)
    reserve = 20 + (args.engine_eval * 2.5 * len(variants) if dev.type == "cuda" else 0)
    deadline = t_run + 60 * args.time_budget_min - reserve if args.time_budget_min else None
    t_train = time.time()
    step = 0
    hist: dict[str, list[float]] = {v: [] for v in variants}
    evals = {}
    bar = tqdm(total=total, desc="feature drafters", file=sys.stdout, mininterval=5.0, disable=None)
    it = iter(tr_loader)
    stopped = None
    t_measure = None
    prof: dict[str, float] = {}

    def tick(key, t):
        if args.profile:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            prof[key] = prof.get(key, 0.0) + now - t
            return now
        return t

    while step < total:
        tp = time.time()
        batch = next(it)
        tp = tick("data", tp)
        sb = target_pass(target, batch, need)
        tp = tick("target", tp)
        prog = step / max(1, total)
        for g in opts.values():
            for pg in g.param_groups:
                pg["lr"] = args.lr * sched(step)
        for v, net in nets.items():
            with autocast(dev):
                loss, st = variant_loss(net, sb, prog)
            if loss.requires_grad:
                opts[v].zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opts[v].step()
            hist[v].append(st["loss"])
            tp = tick(v, tp)
        del sb
        step += 1
        bar.update(1)
        if step == 10:
            t_measure = (time.time(), step)
        if deadline and t_measure and step > t_measure[1] and step % 10 == 0:  # a rate needs steps after the mark
            rate = (step - t_measure[1]) / max(1e-6, time.time() - t_measure[0])
            fit = step + int((deadline - time.time()) * rate)
            if fit < total:
                total = max(step + 1, fit)
                sched.total = total
                bar.total = total
                stopped = f"time budget: {total} of {args.steps} planned steps"
        if step % args.eval_every == 0 or step == total:
            if args.profile:
                bar.write(f"[feat] s/step by phase: " + ", ".join(f"{k} {x / step:.3f}" for k, x in prof.items()))
            ev = evaluate(nets, target, eval_batches, need)
            evals[step] = ev
            bar.write(f"[feat] step {step}/{total} " + "; ".join(
                f"{v}: acc {'/'.join(str(ev[v].get(f'acc{j}', '-')) for j in range(nets[v].cfg.unroll))} "
                f"chain {ev[v]['chain_accept']} loss {ev[v]['loss']}" for v in variants))
    bar.close()
    train_s = time.time() - t_train
    final = evals.get(step) or evaluate(nets, target, eval_batches, need)
    log(f"[feat] trained {step} steps in {train_s:.0f}s" + (f" ({stopped})" if stopped else ""))

    out_root = Path(args.out)
    results = {}
    vanilla_cache: dict = {}
    eng_seeds = held_out_seeds(args.engine_eval, offset=600_000) if args.engine_eval else []
    for v, net in nets.items():
        net.eval()
        path = out_root / f"mmspec-feat-{v}"
        d = FeatureDrafter(net, target, name=f"mmspec-feat-{v}", meta={
            "name": f"mmspec-feat-{v}", "entropy_profile": profile, "chosen_layers": list(choice[0]),
            "supervised_layer": choice[1], "trained": True,
        })
        info = {
            "target_name": Path(target.name).name, "options": json.loads(json.dumps(net.cfg.options())),
            "entropy_profile": profile, "chosen_layers": list(choice[0]), "steps": step, "batch": args.batch,
            "samples": step * args.batch, "lr": args.lr, "train_seconds": round(train_s, 1),
            "hardware": hardware(dev), **size_report(net),
            "quality": {"heldout": final[v], "before_training": before[v]},
            "loss_first10": round(float(np.mean([float(x) for x in hist[v][:10]])), 4) if hist[v] else None,
            "loss_last10": round(float(np.mean([float(x) for x in hist[v][-10:]])), 4) if hist[v] else None,
        }
        save_feature_drafter(d, path, extra={"training": {k: info[k] for k in (
            "steps", "batch", "samples", "lr", "train_seconds", "hardware", "loss_first10", "loss_last10")},
            "quality": info["quality"]})
        if eng_seeds and (deadline is None or time.time() < t_run + 60 * args.time_budget_min - 10):
            loaded = load_feature_drafter(path, target)
            try:
                info["quality"]["engine"] = engine_eval(loaded, target, eng_seeds, args.engine_tree,
                                                        24 if args.smoke else 96, vanilla_cache)
            except Exception as e:  # noqa: BLE001 - a failed check is reported, the drafter is still saved
                info["quality"]["engine"] = {"error": f"{type(e).__name__}: {e}"}
            meta = json.loads((path / "mmspec_drafter.json").read_text())
            meta["quality"] = info["quality"]
            (path / "mmspec_drafter.json").write_text(json.dumps(meta, indent=2))
        results[v] = info
    run_s = time.time() - t_run
    for v, net in nets.items():
        results[v]["run_seconds"] = round(run_s, 1)
        write_card(out_root / f"mmspec-feat-{v}", v, net, results[v])
        meta_p = out_root / f"mmspec-feat-{v}" / "mmspec_drafter.json"
        meta = json.loads(meta_p.read_text())
        meta["training"]["run_seconds"] = round(run_s, 1)
        meta_p.write_text(json.dumps(meta, indent=2))
        q = results[v]["quality"]
        log(f"[feat] {v}: acc {[q['heldout'].get(f'acc{j}') for j in range(net.cfg.unroll)]} "
            f"(before {q['before_training'].get('acc0')}), engine {q.get('engine')}, saved {out_root / f'mmspec-feat-{v}'}")
    log(f"[feat] done in {run_s:.0f}s")
    return results


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
