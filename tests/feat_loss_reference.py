"""Frozen reference: the feature-drafter training loss as computed before the device cache
(commit 9ee69a8 of mmspec/train_feature.py): one target pass per batch, per-sample plans built on
the host at every step, host-side index lists of the loss terms. Kept only as the oracle that the
cached, vectorised loss of mmspec.train_feature must reproduce (tests/test_train_feature.py);
never used by the product."""
import numpy as np
import torch
import torch.nn.functional as F

from mmspec import entropy
from mmspec.drafters.feature.net import FeatNet, rms
from mmspec.drafters.feature.plan import QUERY, TEXT, image_grid, plan_entries

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
    """Entries of every sample (mmspec.drafters.feature.plan.plan_entries, the inference code) as tensors
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
            if c.w_top > 0:
                loss = loss + c.w_top * F.nll_loss(sl, tl.argmax(-1), reduction="none")
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
