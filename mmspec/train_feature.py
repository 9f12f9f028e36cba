"""Train feature-level drafters (EAGLE family, see mmspec.drafters.feature) for a target VLM.

    python -m mmspec.train_feature --variant dream,vispec,aasd --out assets/models --device cuda \
        --time-budget-min 7
    python -m mmspec.train_feature --target DIR --variant eagle --smoke --out /tmp/x   # CPU, tiny

Self-distillation: the target answers `--pool` synthetic world prompts (`mmspec.world.sample_example`;
greedy, a `--sampled-frac` share sampled at T=1); each prompt + answer is run through the target once
and what the drafters read is kept on the device (mmspec.train_feature_data.FeatureCache: hidden
states, answer-position logits, one layer's KV cache, saliency, entry plans). Training steps gather
shuffled rows of that cache: no target forward, no per-sample Python and no host sync in a step.
The drafters learn the target's next-token distributions (KL) and last-layer features (SmoothL1) at
every answer position. All variants train side by side on the same batches.

Per variant: EAGLE-3 training-time test (unroll the drafter `unroll` steps on its own predicted
features, diagonal attention masks, loss weight 0.8**j), plus DREAM's intermediate supervision,
MSD's two-stage schedule (text-only samples, then a share of multimodal samples rising from 5% to
95%), FLASH's future-head losses. Held-out top-1 agreement (teacher-forced on the target's greedy
answers to held-out prompts, every `--eval-every` steps) stops a variant after `--patience`
evaluations without a better chain acceptance; its best weights are kept. The time budget covers
the whole run (pool included). Each variant is saved to OUT/mmspec-feat-<variant>/ with
model.safetensors (fp16, the drafter's own weights only), mmspec_drafter.json and a README.md card
with the held-out curve.

EAGLE-3 is not trained here: its drafter is a head in the vLLM / SGLang format, trained by
`python -m mmspec.train_eagle3 --out OUT/mmspec-feat-eagle3`; `--variant eagle3` is refused with that
command (a separate trainer process: its batches, pool and unroll are its own).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmspec import entropy
from mmspec.drafters.feature.drafter import FeatureDrafter
from mmspec.drafters.feature.files import RETIRED_VARIANT, load_feature_drafter, save_feature_drafter
from mmspec.drafters.feature.net import VARIANTS, FeatNet, Shared, make_config, rms, size_report
from mmspec.drafters.feature.plan import QUERY, TEXT
from mmspec.errors import InputError
from mmspec.train import Schedule
from mmspec.train_feature_data import (  # noqa: F401 - WorldData and Collate are part of this module's API
    TEXT_FRAC, Batch, Collate, FeatureCache, WorldData, batch_entropy, cache_from_batch, item_loader, pad_id,
    target_answers, with_answers,
)

SEED_BASE = 300_000_000  # training seeds (< 10**9); held-out evaluation uses world.held_out_seeds


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------
# The target pass (once per sequence, kept in a FeatureCache) and per-variant training forward


def target_pass(target, batch, need: dict) -> Batch:
    """Run the target once over a collated batch; the variants read the returned rows."""
    return cache_from_batch(target, batch, need)


def _gather(x, idx):
    """x [B, N, ...], idx [B, T] -> [B, T, ...]"""
    shape = idx.shape + x.shape[2:]
    flat = idx.reshape(idx.shape[0], -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, flat).reshape(shape)


def _flat_rows(x, idx):
    """x [B, T, ...], idx [B, Q] -> rows [B, Q, ...] of the flattened [B * T, ...] (one index_select)."""
    B, T = x.shape[:2]
    rows = (idx + T * torch.arange(B, device=idx.device)[:, None]).reshape(-1)
    return x.reshape(B * T, *x.shape[2:]).index_select(0, rows).reshape(*idx.shape, *x.shape[2:])


def sample_weights(c, sb, progress: float, train: bool) -> torch.Tensor:
    """[B] loss weights: MSD's two-stage schedule (text-only, then a rising multimodal share); else 1."""
    if not (c.two_stage and train):
        return torch.ones(sb.B, device=sb.dev)
    img = sb.with_image.float()
    if progress < 0.5:
        return 1.0 - img
    share = 0.05 + 0.9 * min(1.0, (progress - 0.5) / 0.5)
    return img * share + (1 - img) * (1 - share)


def first_input(net: FeatNet, sb, plan, xp):
    """Inputs of the j = 0 pass: x per entry (pooled means, adaptor queries, global fusion), and g."""
    c = net.cfg
    if plan.mem is not None:  # pooled entries: weighted means of their members' inputs
        x0 = (_gather(xp, plan.mem.flatten(1)).view(*plan.mem.shape, -1) * plan.memw[..., None].to(xp.dtype)).sum(2)
    else:
        x0 = _gather(xp, plan.src)
    g = None
    if net.adaptor is not None:
        ad = net.adaptor(sb.img_emb)  # [B, nq, H]
        if c.compress == "queries":
            x0 = torch.where((plan.kind == QUERY)[..., None], _gather(ad, plan.slot).to(x0.dtype), x0)
        if c.global_image:
            g = ad[:, -1:]
            x0 = torch.where(plan.post[..., None], net.fuse_global(x0, g.to(x0.dtype)), x0)
    return x0, g


def side_memories(net: FeatNet, sb):
    """AASD's projected target cache (and its mask), DREAM's cross-attention memory."""
    c, dev = net.cfg, sb.dev
    aasd = cross = None
    if c.aasd:
        Km, Vm = net.aasd_memory(sb.keys, sb.values)
        mpos = torch.arange(Km.shape[2], device=dev)
        aasd = (Km, Vm, (mpos[None, None, :] <= sb.P[:, None, None] - 2))
    if c.dream:
        feats = torch.stack([sb.hs[c.hs_index(i)] for i in c.dream_layers], 1)  # [B, nL, T, H]
        Kc, Vc = net.cross.memory(feats)
        cross = (Kc, Vc, torch.arange(sb.T, device=dev).repeat(len(c.dream_layers)))
    return aasd, cross


def unrolled_input(net: FeatNet, j: int, R, f0, fj_prev, emb_e, post, g, text_R, x0):
    """Inputs of unroll step j >= 1 on rows R: text entries take the feature the drafter predicted
    one step earlier (FLASH: head j of the j = 0 pass), other entries keep their j = 0 input."""
    c = net.cfg
    if c.flash > 1:
        fin = _gather(f0[:, :, min(j, c.flash) - 1], (R - j).clamp_min(0))
    elif j == 1:
        fin = _gather(f0[:, :, 0], (R - 1).clamp_min(0))
    else:
        fin = torch.cat([_gather(f0[:, :, 0], (R[:, :1] - 1).clamp_min(0)), fj_prev[:, :-1]], 1)
    xj = net.input_x(_gather(emb_e, R), fin)
    if g is not None:
        xj = torch.where(_gather(post, R)[..., None], net.fuse_global(xj, g.to(xj.dtype)), xj)
    return torch.where(text_R[..., None], xj.to(x0.dtype), _gather(x0, R))


def unrolled_mask(j: int, R, valid, eidx, qi):
    """Attention of unroll step j's rows R: the j = 0 entries up to R - j, then the diagonal of each
    later step (row i sees its own predecessors' keys)."""
    B = R.shape[0]
    parts = [(eidx[None, None, :] <= (R - j)[:, :, None]) & valid[:, None, :]]
    for i in range(1, j + 1):
        parts.append((qi[None, :] == (qi[:, None] - j + i))[None].expand(B, -1, -1))
    return torch.cat(parts, -1)


def variant_loss(net: FeatNet, sb, progress: float, train: bool = True, capture: dict | None = None):
    """Loss and metrics of one drafter on one cached batch (EAGLE-3 training-time test).

    Every loss term is a masked dense row of [B, Tq1] (the unrolled rows R): no index lists built on
    the host, no host-device synchronisation; shapes come from host-side copies of the plan sizes.
    capture: if a dict, receives the plan and, per unroll step j, (entry indices, features [B, Tq, k, H]).
    Returns (loss tensor, dict of 0-dim tensors: the loss, and with train=False the agreement and KL
    per unroll step)."""
    c = net.cfg
    dev = sb.dev
    plan = sb.plan(c)
    B, Te = sb.B, plan.Te
    emb_next = sb.hs[0][:, 1:]  # [B, N, H] input embedding of token p + 1
    N = emb_next.shape[1]
    feat = net.feature_in({i: h[:, :N] for i, h in sb.hs.items()})
    xp = net.input_x(emb_next, feat, sb.vis)
    x0, g = first_input(net, sb, plan, xp)
    src, kind, post, rope, R, rv = plan.src, plan.kind, plan.post, plan.rope, plan.R, plan.rv
    valid = kind >= 0
    emb_e = _gather(emb_next, src)
    eidx = torch.arange(Te, device=dev)
    is_text = kind == TEXT
    J = max(1, c.unroll)
    Tq1 = R.shape[1]
    aasd, cross_kv = side_memories(net, sb)

    def cross_for(src_rows, j):
        if cross_kv is None:
            return None
        Kc, Vc, cpos = cross_kv
        return (Kc, Vc, cpos[None, None, :] <= (src_rows - j)[..., None])

    w = sample_weights(c, sb, progress, train)
    # Loss terms on rows R: entry R (text, src >= P - 1) with head h predicts q = src + 1 + h <= len - 2.
    src_R, text_R = _gather(src, R), _gather(is_text, R) & rv
    base_ok = text_R & (src_R >= sb.P[:, None] - 1)
    targets = [loss_targets(net, sb, src_R, base_ok, w, h) for h in range(c.flash)]
    total = torch.zeros((), device=dev)
    stats: dict[str, torch.Tensor] = {}
    fj_prev, f0, kv_steps = None, None, []
    qi = torch.arange(Tq1, device=dev)
    for j in range(J):
        if j == 0:
            x, past, rope_j, src_j = x0, None, rope, src
            mask = ((eidx[None, :] <= eidx[:, None])[None] & valid[:, None, :]).expand(B, -1, -1)
            rows_idx = eidx[None].expand(B, -1)
        else:
            rows_idx = R
            x = unrolled_input(net, j, R, f0, fj_prev, emb_e, post, g, text_R, x0)
            rope_j, src_j = _gather(rope, R), src_R
            past = [(torch.cat([s[li][0] for s in kv_steps], 2), torch.cat([s[li][1] for s in kv_steps], 2))
                    for li in range(len(net.layers))]
            mask = unrolled_mask(j, R, valid, eidx, qi)
        am = None
        if aasd is not None:
            am = (aasd[0], aasd[1], aasd[2].expand(-1, x.shape[1], -1))
        r, new, xo = net.run(x, rope_j, past, mask, am, cross_for(src_j, j))
        kv_steps.append(new)
        fh = net.head_feats(r)  # [B, Tq, k, H]
        if capture is not None:
            capture["plan"] = {"src": src, "kind": kind}
            capture[j] = (rows_idx, fh.detach())
        if j == 0:
            f0 = fh
            fh, xo = _gather(fh, R), (_gather(xo, R) if xo is not None else None)  # the loss rows
        else:
            fj_prev = fh[:, :, 0]
        for h in range(c.flash):
            total = total + (0.8**j) * (1.0 if h == 0 else 0.5) * head_loss(
                net, fh[:, :, h], xo if j == 0 and h == 0 else None, targets[h], None if train else stats, j, h)
    stats["loss"] = total.detach()
    return total, stats


def loss_targets(net: FeatNet, sb, src_R, base_ok, w, h: int) -> dict:
    """What head h's loss compares against on rows R, the same at every unroll step: the mask of the
    terms (entry R predicts q = src + 1 + h <= len - 2), their weights, and the target's
    distribution, top-1 token and features at q."""
    c = net.cfg
    q = src_R + 1 + h
    ok = base_ok & (q <= sb.len[:, None] - 2)
    qc = q.clamp(0, sb.T - 1)
    wt = ok.float() * w[:, None]
    prob, negent, top = sb.target_dist()
    t = {"ok": ok, "wt": wt, "wsum": wt.sum().clamp_min(1e-12), "n_ok": ok.sum().clamp_min(1),
         "p": _flat_rows(prob, qc), "negent": _flat_rows(negent, qc), "top": _flat_rows(top, qc)}
    if c.w_feat > 0:
        t["feat"] = _flat_rows(sb.hs[c.L], qc).float()
    if h == 0 and c.dream and c.dream_super >= 0:
        t["inter"] = rms(_flat_rows(sb.hs[c.hs_index(c.dream_super)], qc)).float()
    return t


def head_loss(net: FeatNet, fpred, xo, t: dict, stats: dict | None, j: int, h: int):
    """Weighted mean over the loss rows of KL(target || drafter) (+ feature and DREAM terms) for the
    features fpred [B, Tq1, H] that head h predicts; fills the agreement statistics."""
    c = net.cfg
    sl = torch.log_softmax(net.logits(fpred).float(), -1)
    kl = t["negent"] - (t["p"] * sl).sum(-1)  # sum p log p - sum p log q
    loss = c.w_kl * kl
    if c.w_top > 0:
        loss = loss - c.w_top * sl.gather(-1, t["top"][..., None]).squeeze(-1)
    if "feat" in t:
        loss = loss + c.w_feat * F.smooth_l1_loss(fpred.float(), t["feat"], reduction="none").mean(-1)
    if xo is not None and "inter" in t:
        loss = loss + c.w_inter * F.smooth_l1_loss(rms(xo).float(), t["inter"], reduction="none").mean(-1)
    ok = t["ok"]
    # where(), not a product: rows off the mask never reach the sum (nor its gradient).
    out = torch.where(ok, loss, torch.zeros_like(loss)).mul(t["wt"]).sum() / t["wsum"]
    if stats is None:  # training steps only log the loss: no kernels for metrics nobody reads
        return out
    agree = ((sl.argmax(-1) == t["top"]) & ok).sum().float().div(t["n_ok"]).detach()
    if h == 0:
        stats[f"acc{j}"] = agree
        stats[f"kl{j}"] = (torch.where(ok, kl, torch.zeros_like(kl)).sum() / t["n_ok"]).detach()
    elif j == 0:
        stats[f"head{h}_acc"] = agree
    return out


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


def evaluate(nets, cache: FeatureCache, batch: int):
    """Held-out metrics per variant (teacher-forced on the cached held-out sequences)."""
    out = {}
    agg: dict[str, dict[str, list[torch.Tensor]]] = {v: {} for v in nets}
    for lo in range(0, cache.n, batch):
        sb = cache.view(np.arange(lo, min(cache.n, lo + batch)))
        for v, net in nets.items():
            net.eval()
            with torch.no_grad(), autocast(cache.target.device):
                _, st = variant_loss(net, sb, 1.0, train=False)
            for k, x in st.items():
                agg[v].setdefault(k, []).append(x)
            net.train()
    for v, d in agg.items():
        out[v] = {k: round(float(torch.stack(x).float().mean()), 4) for k, x in d.items()}
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
        f"Feature-level drafter (`mmspec.drafters.feature`, variant `{v}`) for `{info['target_name']}`. "
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
        *training_lines(c, info),
        "",
        "## Measured quality (held-out prompts)",
        "",
        "- Top-1 agreement with the target on the target's greedy answers to held-out prompts, teacher-forced, "
        "by draft depth (training-time-test unroll): "
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
    lines += ["", "## Held-out curve", "", *curve_lines(c, info)]
    path.joinpath("README.md").write_text("\n".join(lines) + "\n")


def training_lines(c, info: dict) -> list[str]:
    pool, held = info["pool"], info["held_out"]
    if pool["answers"] == "target":
        data = (f"- Self-distillation on the target's own answers: {pool['prompts']} synthetic world prompts "
                f"(`mmspec.world.sample_example`, {int(TEXT_FRAC * 100)}% of image questions and half of the text-only "
                f"ones asked without the image) answered by the target ({int(100 * pool['sampled_frac'])}% sampled at "
                f"T=1, the rest greedy; {pool['answer_tokens']} answer tokens, {pool['ended_with_eos']} ended with eos; "
                f"generated in {pool['generation_seconds']:.0f} s), then run through the target once (teacher forcing) and "
                "kept on the device: the drafter learns the target's next-token distributions (KL) and last-layer "
                "features (SmoothL1) at every answer position.")
    else:
        data = (f"- Teacher forcing on {pool['prompts']} synthetic world prompts with their ground-truth answers, run "
                "through the target once; targets = the target's next-token distributions (KL) and last-layer features.")
    return [
        data,
        f"- Loss: {c.w_kl} x KL + {c.w_feat} x SmoothL1(feature)"
        + (f" + {c.w_top} x CE(the target's top-1 token)" if c.w_top else "")
        + (f" + {c.w_inter} x SmoothL1(cross block -> layer {c.dream_super})" if c.dream else "")
        + f"; training-time test over {c.unroll} unrolled steps (weights 0.8^j)"
        + (f"; {c.flash} future heads (weight 0.5 beyond the first)" if c.flash > 1 else "")
        + ("; MSD schedule: text-only samples for the first half, then the multimodal share rises 5% -> 95%" if c.two_stage else "")
        + ".",
        f"- {info['trained_steps']} steps x batch {info['batch']} ({info['samples']} samples), AdamW lr {info['lr']} "
        f"(warm-up, cosine), bf16 autocast on GPU; all variants trained together from one cache of target passes "
        f"in {info['train_seconds']:.0f} s (whole run {info['run_seconds']:.0f} s, pool {pool['seconds']:.0f} s) on "
        f"{info['hardware']}.",
        f"- Stopping: held-out top-1 agreement on {held['prompts']} held-out prompts (the target's greedy answers), "
        f"every {info['eval_every']} steps; a variant stops after {info['patience']} evaluations without a better chain "
        f"acceptance; the weights of its best evaluation are kept (step {info['best_step']})"
        + (f"; run ended by {info['stopped']}" if info.get("stopped") else "") + ".",
    ] + _init_lines(info.get("initialised_from"))


def _init_lines(earlier: dict | None) -> list[str]:
    """--init runs: where the weights started, back to the first run."""
    out = []
    while earlier:
        out.append(f"- Started from the weights of an earlier run: {earlier.get('trained_steps')} steps "
                   f"({earlier.get('samples')} samples, {earlier.get('train_seconds')} s on {earlier.get('hardware')}; "
                   f"{earlier.get('layers', 1)} layer(s)).")
        earlier = earlier.get("initialised_from")
    return out


def curve_lines(c, info: dict) -> list[str]:
    """The held-out curve as a table: top-1 agreement by draft depth and the implied chain acceptance."""
    head = "| step | " + " | ".join(f"depth {j + 1}" for j in range(c.unroll)) + " | chain accept |"
    rows = [head, "|" + "---|" * (c.unroll + 2)]
    for r in info["curve"]:
        accs = " | ".join("-" if a is None else f"{100 * a:.1f}%" for a in r[1:-1])
        rows.append(f"| {r[0]}{' (kept)' if r[0] == info['best_step'] else ''} | {accs} | {r[-1]} |")
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmspec.train_feature", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="target directory (default: the embedded assets/models/mmspec-target)")
    ap.add_argument("--variant", action="append", default=None,
                    help=f"comma-separated names ({', '.join(VARIANTS)}) or 'all'; repeatable, e.g. dream,vispec,aasd "
                         "(EAGLE-3: python -m mmspec.train_eagle3)")
    ap.add_argument("--out", default="assets/models")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None,
                    help="planned steps of the cosine schedule (default 20000: the time budget or patience ends the run "
                         "first; --smoke: 30)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-answer", type=int, default=160)
    ap.add_argument("--pool", type=int, default=8192, help="training prompts answered by the target (self-distillation)")
    # Half sampled: on a pool of mostly greedy answers the drafters matched the target on greedy
    # prefixes but lost about half their acceptance on sampled ones (T=1 decoding).
    ap.add_argument("--sampled-frac", type=float, default=0.5, help="share of the pool answered by sampling at T=1")
    ap.add_argument("--unroll", type=int, default=None,
                    help="training-time-test steps (default: the variant's, 3); a chain drafts well only about as "
                         "deep as the drafter was unrolled in training")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers of the drafter (default: the variant's, 1); with --init a saved drafter "
                         "with fewer layers is grown (the new layers start as the identity)")
    ap.add_argument("--w-top", type=float, default=None,
                    help="weight of a cross-entropy term on the target's most likely token (default 0: KL and "
                         "features only); raises greedy acceptance where the target nearly ties")
    ap.add_argument("--gen-batch", type=int, default=1024, help="prompts per generate call (and per cached target pass)")
    ap.add_argument("--ground-truth", action="store_true", help="learn on the world's answers instead of the target's own")
    ap.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts (the target's greedy answers)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--patience", type=int, default=6,
                    help="evaluations without a better held-out chain acceptance before a variant stops (best kept)")
    ap.add_argument("--time-budget-min", type=float, default=None, help="whole run: pool, training, evaluation, saving")
    ap.add_argument("--engine-eval", type=int, default=2, help="held-out prompts decoded with the engine per variant (0 = skip)")
    ap.add_argument("--engine-tree", default="dynamic:24,5,4")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, metavar="DIR",
                    help="start each variant from DIR/mmspec-feat-VARIANT, saved by an earlier run (same recipe; the unroll may differ)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: few steps, small batches and pool")
    ap.add_argument("--profile", action="store_true", help="synchronise and report time per phase and variant")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps = args.steps or 30
        args.batch = min(args.batch, 6)
        args.max_answer = min(args.max_answer, 24)
        args.pool = min(args.pool, 48)
        args.gen_batch = min(args.gen_batch, 16)
        args.eval_prompts = min(args.eval_prompts, 12)
        args.eval_every = 10
        args.engine_eval = min(args.engine_eval, 1)
        args.device = args.device or "cpu"
        args.lr = max(args.lr, 3e-3)
    args.steps = args.steps or 20000
    if args.layers is not None and args.layers < 1:
        raise InputError("--layers must be at least 1")
    if args.w_top is not None and not 0 <= args.w_top <= 10:
        raise InputError("--w-top must be between 0 and 10")
    return args


def parse_variants(names) -> list[str]:
    variants = []
    for v in names or ["eagle"]:
        for name in (list(VARIANTS) if v == "all" else v.split(",")):
            if name == RETIRED_VARIANT:
                raise InputError(f"--variant {name} is retired: mmspec's EAGLE-3 drafter is a vLLM / SGLang format head, "
                                 "trained by `python -m mmspec.train_eagle3 --out OUT/mmspec-feat-eagle3` (with the same "
                                 "--target, --device, --sampled-frac and --time-budget-min)")
            if name not in VARIANTS:
                raise InputError(f"unknown variant {name!r}: use {', '.join(VARIANTS)} or all")
            if name not in variants:
                variants.append(name)
    return variants


def chunked(loader, n: int):
    """Lists of n items from a loader of item lists, descriptions apart from short answers:
    generate runs until a chunk's longest answer, and one description would keep a chunk of
    one-line answers decoding for 160 steps."""
    bufs: dict[bool, list] = {True: [], False: []}
    for items in loader:
        for it in items:
            buf = bufs[it["kind"] == "describe"]
            buf.append(it)
            if len(buf) == n:
                yield buf[:]
                buf.clear()
    yield from (buf for buf in bufs.values() if buf)


def sampled_count(answered: int, sampled: int, n: int, frac: float) -> int:
    """How many of the next n prompts of a kind to answer by sampling, so that the share sampled so
    far stays at frac (whole chunks were too coarse: 0.5 gave 72% with 1024-prompt chunks)."""
    return min(n, max(0, round((answered + n) * frac) - sampled))


def build_pool(target, need, seeds, args, workers, sampled_frac: float, desc: str):
    """A FeatureCache of the target's own answers to the prompts of `seeds` (greedy; a share
    sampled_frac of each kind's prompts sampled at T=1), or of the world's answers with --ground-truth."""
    t0 = time.time()
    cache, coll = FeatureCache(target, need), Collate(pad_id(target))
    gen_s, eos, n_eos, n_tok, n_sampled = 0.0, target.tokenizer.eos_token_id, 0, 0, 0
    per_kind = {True: [0, 0], False: [0, 0]}  # descriptions / short answers: prompts answered, of them sampled
    for items in chunked(item_loader(target, seeds, 64, workers, args.max_answer), args.gen_batch):
        if not args.ground_truth:
            t = time.time()
            seen = per_kind[items[0]["kind"] == "describe"]
            k = sampled_count(seen[0], seen[1], len(items), sampled_frac)
            seen[0], seen[1] = seen[0] + len(items), seen[1] + k
            answers = target_answers(target, items[:k], args.max_answer, sample=True) if k else []
            if k < len(items):
                answers += target_answers(target, items[k:], args.max_answer, sample=False)
            items = with_answers(items, answers)
            n_sampled += k
            gen_s += time.time() - t
        n_eos += sum(1 for it in items if it["ids"][-1] == eos)
        n_tok += sum(len(it["ids"]) - it["P"] for it in items)
        cache.add(coll(items))
    cache.finish()
    info = {"prompts": cache.n, "answers": "world ground truth" if args.ground_truth else "target",
            "sampled_frac": round(n_sampled / max(1, cache.n), 3),
            "answer_tokens": n_tok, "ended_with_eos": n_eos, "generation_seconds": round(gen_s, 1),
            "seconds": round(time.time() - t0, 1)}
    log(f"[feat] {desc}: {info}")
    return cache, info


def make_nets(variants, target, choice, args):
    nets, opts = {}, {}
    dev = target.device
    for v in variants:
        unroll = 2 if args.smoke else args.unroll
        given = {"unroll": unroll or None, "n_layers": args.layers, "w_top": args.w_top}
        over = {k: v for k, v in given.items() if v is not None}  # what the command line sets; the rest: the variant's
        cfg = make_config(v, target.model, choice, **over)
        net = FeatNet(cfg, Shared(target.model)).to(dev).train()
        if args.init:
            _start_from(net, Path(args.init) / f"mmspec-feat-{v}", target)
        nets[v] = net
        opts[v] = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                    **({"fused": True} if dev.type == "cuda" else {}))
        log(f"[feat] {v}: {size_report(net)} options {cfg.options()}")
    return nets, opts


def _start_from(net: FeatNet, path: Path, target) -> None:
    """--init: this variant's weights from a drafter saved before (a longer run in several calls).
    A drafter with more layers grows from one with fewer: the new layers' output projections start
    at zero, so they add nothing to the residual and the grown drafter drafts what the saved one did."""
    saved = load_feature_drafter(path, target).net
    diff = net.cfg.recipe_differs(saved.cfg)
    n_old, n_new = saved.cfg.n_layers, net.cfg.n_layers
    if diff or n_old > n_new:
        diff += ["n_layers"] if n_old > n_new else []
        raise InputError(f"--init {path} is a differently built drafter ({', '.join(diff)} differ)")
    dtype = next(net.parameters()).dtype
    missing, _ = net.load_state_dict({k: t.to(dtype) for k, t in saved.state_dict().items()}, strict=False)
    if any(not k.startswith(tuple(f"layers.{i}." for i in range(n_old, n_new))) for k in missing):
        raise InputError(f"--init {path}: weights missing for {missing}")
    with torch.no_grad():
        for layer in net.layers[n_old:]:
            layer.attn.o.weight.zero_()
            layer.mlp.down.weight.zero_()
    grown = f" (grown from {n_old} to {n_new} layers)" if n_new > n_old else ""
    log(f"[feat] {net.cfg.variant}: starting from {path}{grown}")


def _earlier_training(path: Path) -> dict:
    """What the --init drafter's own record says of its training (steps, samples, and its own start)."""
    meta = json.loads((path / "mmspec_drafter.json").read_text())
    t = meta.get("training") or {}
    return {**{k: t.get(k) for k in ("trained_steps", "samples", "train_seconds", "initialised_from", "hardware")},
            "layers": (meta.get("config") or {}).get("n_layers", 1)}


def needs(nets) -> dict:
    """What the cache keeps: the union of the variants' hidden-state layers, KV cache, saliency."""
    saliency = any(n.cfg.compress == "topk" for n in nets.values())
    return {"layers": tuple(sorted(set().union(*[n.target_layers for n in nets.values()]))),
            "cache": any(n.cfg.aasd for n in nets.values()), "saliency": saliency,
            "kv_layer": next((n.cfg.aasd_layer for n in nets.values() if n.cfg.aasd), -1)}


class Tracker:
    """Held-out curve and early stopping: per variant, the best chain acceptance (from the top-1
    agreements at every depth), its weights, and the evaluations since it last improved."""

    def __init__(self, nets, patience: int):
        self.nets, self.patience = nets, patience
        self.curve: list[tuple[int, dict]] = []
        self.best: dict[str, tuple[int, dict]] = {}
        self.state: dict[str, dict] = {}
        self.bad = {v: 0 for v in nets}

    def update(self, step: int, ev: dict) -> list[str]:
        """Record an evaluation; returns the variants that ran out of patience now."""
        self.curve.append((step, ev))
        done = []
        for v, e in ev.items():
            if v not in self.best or e["chain_accept"] > self.best[v][1]["chain_accept"]:
                self.best[v] = (step, e)
                self.state[v] = {k: t.detach().clone() for k, t in self.nets[v].state_dict().items()}
                self.bad[v] = 0
            else:
                self.bad[v] += 1
                if self.bad[v] >= self.patience:
                    done.append(v)
        return done

    def restore(self) -> None:
        for v, sd in self.state.items():
            self.nets[v].load_state_dict(sd)

    def rows(self, v: str) -> list[list]:
        """[step, acc0, acc1, ..., chain_accept] per evaluation of v."""
        n = self.nets[v].cfg.unroll
        return [[s, *[ev[v].get(f"acc{j}") for j in range(n)], ev[v]["chain_accept"]] for s, ev in self.curve if v in ev]


def train_loop(nets, opts, pool: FeatureCache, held: FeatureCache, args, deadline) -> dict:
    """Steps over shuffled pool rows until the planned steps, the deadline, or every variant's patience ends."""
    from tqdm import tqdm

    dev = pool.target.device
    total = args.steps
    sched = Schedule(total, warmup=max(3, min(30, total // 10)), floor=0.05)
    rng = np.random.default_rng(args.seed)
    track, active = Tracker(nets, args.patience), dict(nets)
    hist: dict[str, list[torch.Tensor]] = {v: [] for v in nets}
    prof: dict[str, float] = {}
    step, order, stopped, t_measure, t0 = 0, np.zeros(0, np.int64), None, None, time.time()
    bar = tqdm(total=total, desc="feature drafters", file=sys.stdout, mininterval=5.0, disable=None)

    def tick(key, t):
        if not args.profile:
            return t
        if dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.time()
        prof[key] = prof.get(key, 0.0) + now - t
        return now

    while step < total and active:
        if len(order) < args.batch:  # a new epoch: every pool row once, in a fresh order
            order = np.concatenate([order, rng.permutation(pool.n)])
        idx, order = order[: args.batch], order[args.batch:]
        tp = time.time()
        sb = pool.view(idx)
        tp = tick("gather", tp)
        for g in opts.values():
            for pg in g.param_groups:
                pg["lr"] = args.lr * sched(step)
        for v, net in active.items():
            with autocast(dev):
                loss, st = variant_loss(net, sb, step / max(1, total))
            opts[v].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opts[v].step()
            hist[v].append(st["loss"])
            tp = tick(v, tp)
        step += 1
        bar.update(1)
        if step == 10:
            t_measure = (time.time(), step)
        if deadline and t_measure and step > t_measure[1] and step % 10 == 0:  # a rate needs steps after the mark
            rate = (step - t_measure[1]) / max(1e-6, time.time() - t_measure[0])
            fit = step + int((deadline - time.time()) * rate)
            if fit < total:
                total = sched.total = bar.total = max(step + 1, fit)
                stopped = f"time budget: {total} of {args.steps} planned steps"
        if step % args.eval_every == 0 or step == total:
            if args.profile:
                bar.write("[feat] s/step by phase: " + ", ".join(f"{k} {x / step:.4f}" for k, x in prof.items()))
            ev = evaluate(active, held, args.batch)
            for v in track.update(step, ev):
                del active[v]
                bar.write(f"[feat] {v}: no better held-out agreement for {args.patience} evaluations; "
                          f"best at step {track.best[v][0]}")
            bar.write(f"[feat] step {step}/{total} " + "; ".join(
                f"{v}: acc {'/'.join(str(ev[v].get(f'acc{j}', '-')) for j in range(nets[v].cfg.unroll))} "
                f"chain {ev[v]['chain_accept']} loss {ev[v]['loss']}" for v in ev))
    bar.close()
    if not active and step < total:
        stopped = f"patience: every variant stopped improving by step {step}"
    track.restore()
    return {"steps": step, "stopped": stopped, "seconds": time.time() - t0, "track": track,
            "hist": {v: torch.stack(h).float().tolist() if h else [] for v, h in hist.items()}}  # one sync each


def main(argv=None) -> dict:
    from mmspec.load import load_target
    from mmspec.world import held_out_seeds

    args = parse_args(argv)
    t_run = time.time()
    # Shapes change every batch: let the caching allocator grow segments instead of fragmenting.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    variants = parse_variants(args.variant)
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: threads only contend
    target = load_target(args.target, args.device)
    if target.family.name != "llava":
        raise InputError("train_feature supports 1-D RoPE targets (LLaVA family); inference works for all families")
    dev = target.device
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        try:  # per-shape plan building of cuDNN attention does not pay off: generate changes shape every token
            torch.backends.cuda.enable_cudnn_sdp(False)
        except AttributeError:
            pass
    torch.manual_seed(args.seed)
    workers = args.workers if args.workers is not None else (0 if args.smoke or dev.type == "cpu" else min(14, (os.cpu_count() or 2) - 2))
    log(f"[feat] target {target.name} on {dev} ({target.dtype}); variants {variants}; {hardware(dev)}")

    held_seeds = held_out_seeds(args.eval_prompts, offset=500_000)
    # Attention-entropy calibration (DREAM layer choice) on held-out prompts with the world's answers.
    t0 = time.time()
    first = next(iter(item_loader(target, held_seeds[: args.batch], args.batch, 0, args.max_answer)))
    profile = batch_entropy(target, Collate(pad_id(target))(first))
    choice = entropy.choose_layers(profile)
    log(f"[feat] entropy profile {[round(x, 3) for x in profile]} -> chosen layers {choice[0]}, supervised {choice[1]} "
        f"({time.time() - t0:.1f}s)")
    nets, opts = make_nets(variants, target, choice, args)
    need = needs(nets)
    held, held_info = build_pool(target, need, held_seeds, args, workers, 0.0, "held-out prompts")
    seeds = [SEED_BASE + args.seed * 10_000_000 + i for i in range(args.pool)]
    pool, pool_info = build_pool(target, need, seeds, args, workers, args.sampled_frac, "training pool")
    before = evaluate(nets, held, args.batch)
    log("[feat] before training: " + "; ".join(f"{v} acc0 {before[v].get('acc0')} loss {before[v]['loss']}" for v in variants))

    reserve = 20 + (args.engine_eval * 2.5 * len(variants) if dev.type == "cuda" else 0)
    deadline = t_run + 60 * args.time_budget_min - reserve if args.time_budget_min else None
    run = train_loop(nets, opts, pool, held, args, deadline)
    log(f"[feat] trained {run['steps']} steps in {run['seconds']:.0f}s" + (f" ({run['stopped']})" if run["stopped"] else ""))
    results = save_all(nets, target, args, t_run, deadline, {
        "profile": profile, "choice": choice, "before": before, "run": run, "pool": pool_info, "held": held_info})
    log(f"[feat] done in {time.time() - t_run:.0f}s")
    return results


def save_all(nets, target, args, t_run, deadline, ctx) -> dict:
    """Save every variant (best held-out weights), check it end to end with the engine, write the cards."""
    out_root, dev = Path(args.out), target.device
    run, track = ctx["run"], ctx["run"]["track"]
    profile, choice = ctx["profile"], ctx["choice"]
    results, vanilla_cache = {}, {}
    eng_seeds = held_out_seeds_engine(args.engine_eval)
    for v, net in nets.items():
        net.eval()
        path = out_root / f"mmspec-feat-{v}"
        d = FeatureDrafter(net, target, name=f"mmspec-feat-{v}", meta={
            "name": f"mmspec-feat-{v}", "entropy_profile": profile, "chosen_layers": list(choice[0]),
            "supervised_layer": choice[1], "trained": True,
        })
        hist = run["hist"][v]
        best_step, best = track.best[v]
        info = {
            "target_name": Path(target.name).name, "options": json.loads(json.dumps(net.cfg.options())),
            "entropy_profile": profile, "chosen_layers": list(choice[0]), "steps": run["steps"],
            "trained_steps": len(hist), "best_step": best_step, "stopped": run["stopped"], "batch": args.batch,
            "eval_every": args.eval_every, "patience": args.patience,
            "samples": len(hist) * args.batch, "lr": args.lr, "train_seconds": round(run["seconds"], 1),
            "initialised_from": _earlier_training(Path(args.init) / f"mmspec-feat-{v}") if args.init else None,
            "hardware": hardware(dev), "pool": ctx["pool"], "held_out": ctx["held"], **size_report(net),
            "curve": track.rows(v), "quality": {"heldout": best, "before_training": ctx["before"][v]},
            "loss_first10": round(float(np.mean(hist[:10])), 4) if hist else None,
            "loss_last10": round(float(np.mean(hist[-10:])), 4) if hist else None,
        }
        save_feature_drafter(d, path, extra={"training": {k: info[k] for k in (
            "steps", "trained_steps", "best_step", "stopped", "batch", "samples", "lr", "train_seconds", "hardware",
            "initialised_from",
            "loss_first10", "loss_last10", "pool", "held_out", "curve")}, "quality": info["quality"]})
        if eng_seeds and (deadline is None or time.time() < t_run + 60 * args.time_budget_min - 10):
            info["quality"]["engine"] = engine_check(path, target, eng_seeds, args, vanilla_cache)
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
            f"(before {q['before_training'].get('acc0')}) at step {results[v]['best_step']}, engine {q.get('engine')}, "
            f"saved {out_root / f'mmspec-feat-{v}'}")
    return results


def held_out_seeds_engine(n: int) -> list[int]:
    from mmspec.world import held_out_seeds

    return held_out_seeds(n, offset=600_000) if n else []


def engine_check(path, target, seeds, args, vanilla_cache) -> dict:
    """Reload the saved drafter and decode held-out prompts with the engine (a failure is reported)."""
    loaded = load_feature_drafter(path, target)
    try:
        res = engine_eval(loaded, target, seeds, args.engine_tree, 24 if args.smoke else 96, vanilla_cache)
    except Exception as e:  # noqa: BLE001 - a failed check is reported, the drafter is still saved
        res = {"error": f"{type(e).__name__}: {e}"}
    meta_p = Path(path) / "mmspec_drafter.json"
    meta = json.loads(meta_p.read_text())
    meta["quality"]["engine"] = res
    meta_p.write_text(json.dumps(meta, indent=2))
    return res


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
