"""Train an EAGLE-3 head in the vLLM / SGLang / SpecForge format for a target VLM (mmspec.drafters.eagle3_head).

    python -m mmspec.train_eagle3 --target assets/models/mmspec-target --out assets/models/mmspec-feat-eagle3 \\
        --device cuda --time-budget-min 4
    python -m mmspec.train_eagle3 --target DIR --out /tmp/head --smoke          # CPU, < 60 s

Self-distillation: the target answers prompts of the synthetic world (`mmspec.world`; greedy, and a
sampled share at T=1), and the head learns the target's own next-token distributions on those
answers (KL, restricted to the draft vocabulary and renormalised), with EAGLE-3's training-time
test: `unroll_batch` runs the head `--unroll` steps on its own states along the true continuation,
depth j weighted 0.8**j. Per step one frozen target forward (no grad, bf16 autocast on CUDA) gives
the aux hidden states and the teacher distributions of a padded batch; no host syncs except logging.
LLaVA-family targets use 1-D positions; M-RoPE targets (Qwen2-VL) get every sequence's 3-D positions
once, from the model's own rope index, for both the target pass and the head.
Held-out prompts (`world.held_out_seeds`, answered greedily) measure top-1 agreement by depth every
`--eval-every` steps; training stops at the time budget or when agreement stops improving
(`--patience`), and the best head is saved with `save_mmspec_head` (loads with `--drafter`, exports
with `python -m mmspec export-eagle3`) plus a README.md card.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmspec.drafters.eagle3_head import Eagle3HeadDrafter, create_head, save_mmspec_head, unroll_batch
from mmspec.errors import InputError
from mmspec.drafters.feature.net import text_config
from mmspec.train import POOL_SEED_BASE, autocast, hardware, log
from mmspec.train_feature import engine_eval, expected_accept

SEED_BASE = POOL_SEED_BASE + 100_000_000  # training prompts (< 10**9), apart from train.py's pool seeds
HELD_OUT_OFFSET = 700_000  # world.held_out_seeds offset: apart from train_feature's 500_000 / 600_000
DEPTH_WEIGHT = 0.8  # EAGLE-3's loss weight of unroll depth j: DEPTH_WEIGHT ** j


# ------------------------------------------------------------------------------------------------
# Prompts and the target's answers


PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")  # the processor's other outputs are per image


class Prompts(torch.utils.data.Dataset):
    """World prompts through the target's own processor: ids, M-RoPE token types, per-image tensors."""

    def __init__(self, target, seeds: list[int]):
        self.proc, self.family, self.seeds = target.processor, target.family, seeds

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, i):
        from mmspec.world import sample_example

        seed = self.seeds[i]
        img, qa, _ = sample_example(seed)
        # As the target was trained: questions that need no image go without it half the time.
        with_image = qa.needs_image or random.Random(seed ^ 0x5EED).random() >= 0.5
        inputs = self.family.prefill_inputs(self.proc, img if with_image else None, qa.prompt)
        types = inputs.get("mm_token_type_ids")
        return {"prompt": inputs["input_ids"][0].tolist(), "types": None if types is None else types[0].tolist(),
                "media": {k: v for k, v in inputs.items() if k not in PER_TOKEN} if with_image else {}}


def _left_padded(items, pad: int):
    """A generate() batch: prompts (and token types) left-padded, per-image tensors of the rows with an
    image concatenated in row order."""
    L = max(len(it["prompt"]) for it in items)
    ids = torch.full((len(items), L), pad, dtype=torch.long)
    att = torch.zeros((len(items), L), dtype=torch.long)
    types = torch.zeros((len(items), L), dtype=torch.long)
    for b, it in enumerate(items):
        ids[b, L - len(it["prompt"]):] = torch.tensor(it["prompt"])
        att[b, L - len(it["prompt"]):] = 1
        types[b, L - len(it["prompt"]):] = torch.tensor(it["types"] or [0] * len(it["prompt"]))
    inputs = {"input_ids": ids, "attention_mask": att}
    if any(it["types"] is not None for it in items):
        inputs["mm_token_type_ids"] = types
    for k in {k for it in items for k in it["media"]}:
        inputs[k] = torch.cat([it["media"][k] for it in items if it["media"]])
    return items, inputs


@torch.no_grad()
def answer_batch(target, inputs: dict, max_new: int, sample: bool) -> list[list[int]]:
    """The target's answers (greedy, or sampled at T=1) up to and including eos, cut before any image
    or video placeholder token (a training forward would look for its features)."""
    dev, eos, pad = target.device, sorted(target.eos_ids), _pad_id(target)
    c = target.model.config
    media = {getattr(c, k, None) for k in ("image_token_id", "image_token_index", "video_token_id")} - {None}
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    with autocast(dev):
        out = target.model.generate(**_on_device(inputs, target), max_new_tokens=max_new, eos_token_id=eos,
                                    pad_token_id=pad, **kw)
    answers = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        end = next((i + (t in eos) for i, t in enumerate(row) if t in eos or t in media), len(row))
        answers.append(row[:end])
    return answers


def _on_device(tensors: dict, target) -> dict:
    """On the target's device; floating tensors (pixel values) in its dtype."""
    return {k: v.to(target.device, target.dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}


def _pad_id(target) -> int:
    pad = target.tokenizer.pad_token_id
    return int(pad) if pad is not None else 0


@dataclass
class Pool:
    """Packed sequences (prompt + answer), right-padded, on the training device; CPU copies of what
    batch planning reads, so that assembling a batch never waits on the device."""

    ids: torch.Tensor  # [N, Tmax]
    lens: torch.Tensor  # [N]
    P: torch.Tensor  # [N] prompt lengths
    media: dict[str, torch.Tensor]  # per-image processor outputs stacked [N_img, ...] (pixel values, grids)
    pos: torch.Tensor | None  # [N, 3, Tmax] M-RoPE positions (None: 1-D, position = index)
    lens_np: np.ndarray
    img_slot_np: np.ndarray  # [N] row of the media, -1 without an image
    sampled: int  # how many answers were sampled (the rest greedy)


def make_pool(target, seeds: list[int], args, sampled_frac: float, deadline: float | None) -> Pool:
    """Answer the prompts in batches, a `sampled_frac` share of the batches sampled (spread out, so
    that an early stop at `deadline` keeps the mix)."""
    workers = args.workers
    if workers is None:  # rendering and the processor run in workers while the GPU generates
        workers = 0 if target.device.type == "cpu" else min(8, (os.cpu_count() or 2) - 2)
    loader = torch.utils.data.DataLoader(Prompts(target, seeds), batch_size=args.gen_batch, num_workers=workers,
                                         collate_fn=lambda items: _left_padded(items, _pad_id(target)))
    rows, done = [], 0
    for k, (items, inputs) in enumerate(loader):
        sample = round((k + 1) * sampled_frac) > round(k * sampled_frac)
        answers = answer_batch(target, inputs, args.max_new, sample)
        _media_to_device(items, inputs, target)
        rows += [(it, a, sample) for it, a in zip(items, answers)]
        done += len(items)
        if deadline is not None and time.time() > deadline:
            log(f"[eagle3] pool: time share used after {done} of {len(seeds)} prompts")
            break
    return pack(rows, target, _pad_id(target))


def _media_to_device(items, inputs: dict, target) -> None:
    """Each item's per-image tensors become views of the batch's, on the device in the target's dtype
    (fp32 host copies of 16k images would be 8 GB)."""
    with_media = [it for it in items if it["media"]]
    for k in with_media[0]["media"] if with_media else ():
        parts = _on_device({k: inputs[k]}, target)[k].split([len(it["media"][k]) for it in with_media])
        for it, part in zip(with_media, parts):
            it["media"][k] = part


def pack(rows, target, pad: int) -> Pool:
    """(prompt item, answer, sampled) rows -> a Pool; answers under two tokens teach nothing (dropped)."""
    rows = [r for r in rows if len(r[1]) >= 2]
    if not rows:
        raise InputError("the target gave no answer of two tokens or more: nothing to train on")
    seqs = [it["prompt"] + a for it, a, _ in rows]
    ids = torch.full((len(seqs), max(map(len, seqs))), pad, dtype=torch.long)
    types = torch.zeros_like(ids)  # answers are text (type 0)
    for i, (s, (it, _, _)) in enumerate(zip(seqs, rows)):
        ids[i, : len(s)] = torch.tensor(s)
        types[i, : len(it["prompt"])] = torch.tensor(it["types"] or [0] * len(it["prompt"]))
    imgs = [it["media"] for it, _, _ in rows if it["media"]]
    if any(m[k].shape != imgs[0][k].shape for m in imgs for k in m):
        raise InputError("training images must share one size (one processor output shape per image)")
    media = {k: torch.stack([m[k] for m in imgs]) for k in (imgs[0] if imgs else ())}
    slots = np.cumsum([bool(it["media"]) for it, _, _ in rows]) - 1
    slots[[not it["media"] for it, _, _ in rows]] = -1
    lens = torch.tensor([len(s) for s in seqs])
    dev = target.device
    return Pool(ids.to(dev), lens.to(dev), torch.tensor([len(it["prompt"]) for it, _, _ in rows], device=dev),
                media, mrope_positions(target, ids, lens, types, media), lens.numpy(), slots,
                sum(s for _, _, s in rows))


def mrope_positions(target, ids, lens, types, media) -> torch.Tensor | None:
    """[N, 3, T] positions of every sequence for an M-RoPE target, computed once by the model's own
    rope index (text after an image sits at index + delta on all axes); None for 1-D targets."""
    tc = text_config(target.model)
    rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    if "mrope_section" not in rope:
        return None
    dev = target.device
    att = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
    inputs = {"input_ids": ids.to(dev), "attention_mask": att.to(dev), "mm_token_type_ids": types.to(dev),
              **{k: v.flatten(0, 1) for k, v in media.items() if not v.is_floating_point()}}  # the grids
    pos = target.family.prefill_position_ids(target.model, inputs)
    if pos is None:  # no image in the pool: every axis is the index
        return torch.arange(ids.shape[1], device=dev).expand(len(ids), 3, -1)
    return pos.permute(1, 0, 2).contiguous()


def draft_vocabulary(pool: Pool, vocab: int, k: int) -> list[int]:
    """The k target ids most frequent in the pool's answers (k <= 0 or >= vocab: the whole vocabulary).
    Frequent ids are what a head is asked to draft; ties (unseen ids fill up) go to the lower id."""
    if k <= 0 or k >= vocab:
        return list(range(vocab))
    pos = torch.arange(pool.ids.shape[1], device=pool.ids.device)
    answer = (pos >= pool.P[:, None]) & (pos < pool.lens[:, None])
    counts = torch.bincount(pool.ids[answer], minlength=vocab).cpu().double()
    order = torch.argsort(counts - torch.arange(vocab) / (2 * vocab), descending=True)  # stable: lower id first
    return sorted(order[:k].tolist())


# ------------------------------------------------------------------------------------------------
# Batches and the training step


def plan_batches(pool: Pool, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch: rows grouped by length (a 200-token description padded next to one-line answers
    would double a batch's cost), with jitter so that groups change between epochs, in random order."""
    order = np.argsort(pool.lens_np + rng.uniform(0, 24, len(pool.lens_np)))
    groups = [order[i: i + batch] for i in range(0, len(order), batch)]
    return [groups[i] for i in rng.permutation(len(groups))]


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T]
    lens: torch.Tensor  # [B]
    P: torch.Tensor  # [B]
    media: dict[str, torch.Tensor]  # the processor's per-image inputs of the rows with an image
    pos: torch.Tensor | None  # [B, 3, T] M-RoPE positions


def take(pool: Pool, idx: np.ndarray) -> Batch:
    """Rows idx of the pool, cut to their longest (rounded up to 16: fewer distinct shapes)."""
    T = min(pool.ids.shape[1], -(-int(pool.lens_np[idx].max()) // 16) * 16)
    rows = torch.from_numpy(idx).to(pool.ids.device, non_blocking=True)
    slots = pool.img_slot_np[idx]
    slots = torch.from_numpy(slots[slots >= 0]).to(pool.ids.device, non_blocking=True)
    media = {k: v[slots].flatten(0, 1) for k, v in pool.media.items()} if len(slots) else {}
    pos = pool.pos[rows, :, :T] if pool.pos is not None else None
    return Batch(pool.ids[rows, :T], pool.lens[rows], pool.P[rows], media, pos)


@torch.no_grad()
def teacher(target, layers: tuple[int, ...], draft_ids: torch.Tensor, b: Batch):
    """One frozen target forward: aux features [B, T, 3*Ht] (lowest layer first), the teacher's
    log-probs over the draft vocabulary renormalised [B, T, Vd], and its greedy token [B, T]."""
    kw = dict(b.media) if b.pos is None else {**b.media, "position_ids": b.pos.permute(1, 0, 2)}
    # No attention mask: with right padding the causal mask keeps every real position off the pads,
    # and a padding mask would cost a host sync (transformers checks whether it is all ones).
    with autocast(target.device):
        out = target.model(input_ids=b.ids, output_hidden_states=True, use_cache=False, **kw)
    aux = torch.cat([out.hidden_states[i] for i in layers], -1)
    return aux, F.log_softmax(out.logits[..., draft_ids].float(), -1), out.logits.argmax(-1)


def depth_rows(b: Batch, j: int):
    """Loss rows of depth j + 1: entry p predicts the target at q = p + 1 + j, counted when q is an
    answer position that drafting can reach (q >= P: the first answer token is the target's own) and
    predicts a real token (q <= len - 2). Returns the mask [B, T - 1 - j] over entries 0..T-2-j."""
    q = torch.arange(1 + j, b.ids.shape[1], device=b.ids.device)[None]
    return (q >= b.P[:, None]) & (q <= b.lens[:, None] - 2)


def head_pass(head, target, layers, draft_ids, b: Batch, steps: int, pad: int):
    """Per depth: (KL summed over its rows, top-1 agreements, rows), all device scalars."""
    aux, tlogp, greedy = teacher(target, layers, draft_ids, b)
    B, T = b.ids.shape
    n = T - 1  # entry p = (aux[p], token p + 1): the last position has no next token
    tokens = F.pad(b.ids, (0, steps - 1), value=pad)
    pos = torch.arange(n, device=b.ids.device).expand(B, n) if b.pos is None else b.pos[..., :n]
    out = []
    with autocast(target.device):
        logits = unroll_batch(head, aux[:, :n], tokens, pos, steps)
    for j, lg in enumerate(logits):
        rows = depth_rows(b, j).float()
        lp = F.log_softmax(lg[:, : n - j].float(), -1)
        t = tlogp[:, 1 + j:]
        kl = (t.exp() * (t - lp)).sum(-1)
        agree = head.target_ids()[lg[:, : n - j].argmax(-1)] == greedy[:, 1 + j:]
        out.append(((kl * rows).sum(), (agree * rows).sum(), rows.sum()))
    return out


def step_loss(parts) -> torch.Tensor:
    return sum(DEPTH_WEIGHT ** j * kl / rows.clamp(min=1) for j, (kl, _, rows) in enumerate(parts))


def lr_at(progress: float, warmup: float = 0.05, floor: float = 0.05) -> float:
    """Linear warm-up then cosine to `floor`, over the run's progress (steps or time, whichever is ahead)."""
    if progress < warmup:
        return max(progress / warmup, 0.02)
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(head, target, layers, draft_ids, batches, steps, pad) -> dict:
    """Held-out, teacher-forced: mean KL and top-1 agreement with the target's greedy token by depth."""
    head.eval()
    tot = None
    for b in batches:
        parts = torch.stack([torch.stack(p) for p in head_pass(head, target, layers, draft_ids, b, steps, pad)])
        tot = parts if tot is None else tot + parts
    head.train()
    kl, agree, rows = tot.cpu().unbind(1)  # the one host sync of an evaluation
    acc = (agree / rows.clamp(min=1)).tolist()
    return {"agree": [round(a, 4) for a in acc], "kl": round(float((kl / rows.clamp(min=1)).mean()), 4),
            "chain_accept": round(expected_accept(acc), 3)}


# ------------------------------------------------------------------------------------------------
# The run


def aux_layers(target, text: str | None) -> tuple[int, ...]:
    """--aux as given, else the format's default (2, L//2, L-3); three distinct ids in 0..L-1."""
    L = text_config(target.model).num_hidden_layers
    try:
        ids = tuple(int(x) for x in text.split(",")) if text else (2, L // 2, L - 3)
    except ValueError:
        raise InputError(f"--aux must be three comma-separated layer ids, not {text!r}") from None
    if len(set(ids)) != 3 or len(ids) != 3 or not all(0 <= i < L for i in ids):
        raise InputError(f"aux layers {list(ids)} are not three distinct hidden_states ids in 0..{L - 1} for this "
                         f"{L}-layer target (hidden_states[{L}] is final-normed); pass --aux, e.g. --aux 1,{L // 2},{L - 1}")
    return tuple(sorted(ids))


class Trainer:
    """The loop's state: head, optimiser, data, curve, best head so far."""

    def __init__(self, args, target, head, pools: tuple[Pool, Pool], t_run: float):
        self.args, self.target, self.head = args, target, head
        self.train_pool, self.eval_pool = pools
        self.layers = head.cfg.aux
        self.draft_ids = head.target_ids()
        self.pad = _pad_id(target)
        dev = target.device
        self.params = [p for p in head.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                     **({"fused": True} if dev.type == "cuda" else {}))
        by_len = np.argsort(self.eval_pool.lens_np)  # short answers batched together: less padding
        self.eval_batches = [take(self.eval_pool, by_len[i: i + args.batch]) for i in range(0, len(by_len), args.batch)]
        self.rng = np.random.default_rng(args.seed)
        self.curve: list[dict] = []
        self.best: tuple[float, int, dict] | None = None
        self.stopped = "planned steps"
        self.loss_sum, self.n_loss = torch.zeros((), device=target.device), 0  # on the device: no sync per step
        reserve = 40 if dev.type == "cuda" else 3  # final evaluation, saving, the engine check, the card
        self.deadline = t_run + 60 * args.time_budget_min - reserve if args.time_budget_min else None

    def evaluate(self) -> dict:
        return evaluate(self.head, self.target, self.layers, self.draft_ids, self.eval_batches, self.args.unroll, self.pad)

    def train_step(self, b: Batch, progress: float) -> torch.Tensor:
        for g in self.opt.param_groups:
            g["lr"] = self.args.lr * lr_at(progress)
        loss = step_loss(head_pass(self.head, self.target, self.layers, self.draft_ids, b, self.args.unroll, self.pad))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.detach()

    def record(self, step: int, t0: float) -> bool:
        """Evaluate, log, keep the best head; True when agreement has not improved for --patience evals."""
        ev = self.evaluate()
        mean_agree = sum(ev["agree"]) / len(ev["agree"])
        loss = float(self.loss_sum) / max(1, self.n_loss)  # mean training loss since the last evaluation
        self.loss_sum.zero_()
        self.n_loss = 0
        self.curve.append({"step": step, "seconds": round(time.time() - t0, 1), "train_loss": round(loss, 4), **ev})
        log(f"[eagle3] step {step} {step / max(1e-6, time.time() - t0):.2f} steps/s loss {loss:.4f} "
            f"held-out agree {'/'.join(f'{a:.3f}' for a in ev['agree'])} kl {ev['kl']} chain {ev['chain_accept']}")
        if self.best is None or mean_agree > self.best[0] + self.args.min_delta:
            self.best = (mean_agree, step, {k: v.detach().clone() for k, v in self.head.state_dict().items()})
        evals_since = sum(1 for c in self.curve if c["step"] > self.best[1])
        return evals_since >= self.args.patience

    def run(self) -> int:
        a = self.args
        t0, step = time.time(), 0
        budget = (self.deadline - t0) if self.deadline else None
        with self.target.family.graph_capture(self.target.model):  # the bare image-token mask: its count check syncs
            while step < a.steps:
                for idx in plan_batches(self.train_pool, a.batch, self.rng):
                    progress = max(step / a.steps, (time.time() - t0) / budget if budget else 0.0)
                    if progress >= 1.0:
                        self.stopped = "time budget" if step < a.steps else "planned steps"
                        return step
                    self.loss_sum += self.train_step(take(self.train_pool, idx), progress)
                    step, self.n_loss = step + 1, self.n_loss + 1
                    if step % a.eval_every == 0 and self.record(step, t0):
                        self.stopped = f"no gain in held-out agreement for {a.patience} evaluations"
                        return step
        return step


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmspec.train_eagle3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="target directory (default: the embedded assets/models/mmspec-target)")
    ap.add_argument("--out", required=True, help="the head directory to write")
    ap.add_argument("--device", default=None)
    ap.add_argument("--aux", default=None, help="three target hidden_states ids, e.g. 2,8,13 (default: 2,L//2,L-3)")
    ap.add_argument("--draft-vocab", type=int, default=0, help="top-K answer tokens as draft vocabulary (0: all)")
    ap.add_argument("--prompts", type=int, default=16384, help="training prompts the target answers")
    ap.add_argument("--sampled-frac", type=float, default=0.3,
                    help="share of the generate batches sampled at T=1 (the rest greedy)")
    ap.add_argument("--eval-prompts", type=int, default=512, help="held-out prompts (answered greedily)")
    ap.add_argument("--max-new", type=int, default=160, help="longest answer generated")
    ap.add_argument("--gen-batch", type=int, default=None,
                    help="prompts per generate call (default 1024 on a GPU, 32 on a CPU: the time budget is checked between calls)")
    ap.add_argument("--pool-share", type=float, default=0.4, help="most of the time budget answer generation may use")
    ap.add_argument("--steps", type=int, default=8000, help="at most this many steps (the time budget usually ends first)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--unroll", type=int, default=3, help="training-time-test depth")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--patience", type=int, default=4, help="evaluations without a gain before stopping")
    ap.add_argument("--min-delta", type=float, default=0.002, help="smallest gain in mean agreement that counts")
    ap.add_argument("--engine-eval", type=int, default=4, help="held-out prompts decoded by the engine at the end (0: skip)")
    ap.add_argument("--engine-tree", default="dynamic:24,5,4")
    ap.add_argument("--engine-max-new", type=int, default=96)
    ap.add_argument("--time-budget-min", type=float, default=None, help="whole run: answers, training, saving")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (< 60 s)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.prompts, args.eval_prompts, args.max_new, args.gen_batch = 48, 12, 24, 16
        args.steps, args.batch, args.eval_every, args.patience = min(args.steps, 40), 8, 10, 100
        args.engine_eval, args.engine_max_new = min(args.engine_eval, 1), 24
        torch.set_num_threads(1)  # tiny tensors: threads only contend
    return args


def main(argv=None) -> dict:
    from mmspec.load import load_target
    from mmspec.world import held_out_seeds

    args = parse_args(argv)
    t_run = time.time()
    target = load_target(args.target, args.device)
    args.gen_batch = args.gen_batch or (1024 if target.device.type == "cuda" else 32)
    layers = aux_layers(target, args.aux)
    torch.manual_seed(args.seed)
    log(f"[eagle3] target {target.name} on {target.device} ({target.dtype}), aux layers {list(layers)}; "
        f"{hardware(target.device)}")
    pool_deadline = t_run + 60 * args.time_budget_min * args.pool_share if args.time_budget_min else None
    t0 = time.time()
    seeds = [SEED_BASE + args.seed * 10_000_000 + i for i in range(args.prompts)]
    train_pool = make_pool(target, seeds, args, args.sampled_frac, pool_deadline)
    eval_pool = make_pool(target, held_out_seeds(args.eval_prompts, HELD_OUT_OFFSET), args, 0.0, None)
    pool_s = time.time() - t0
    n_tok = int((train_pool.lens - train_pool.P).sum())
    log(f"[eagle3] target answered {len(train_pool.lens_np)} training prompts ({train_pool.sampled} sampled, "
        f"{n_tok} answer tokens) and {len(eval_pool.lens_np)} held-out ones in {pool_s:.0f}s")
    V = text_config(target.model).vocab_size
    drafter = create_head(target, layers, draft_vocabulary(train_pool, V, args.draft_vocab), seed=args.seed,
                          name=Path(args.out).resolve().name)
    head = drafter.head.float().train()  # fp32 master weights; bf16 autocast does the compute on CUDA
    trainer = Trainer(args, target, head, (train_pool, eval_pool), t_run)
    before = trainer.evaluate()
    log(f"[eagle3] before training: agree {before['agree']} kl {before['kl']}; draft vocab {head.cfg.draft_vocab} of {V}")
    t_train = time.time()
    steps = trainer.run()
    train_s = time.time() - t_train
    if not trainer.curve or trainer.curve[-1]["step"] != steps:
        trainer.record(steps, t_train)
    best_agree, best_step, state = trainer.best
    head.load_state_dict(state)
    final = next(c for c in trainer.curve if c["step"] == best_step)
    info = {"steps": steps, "best_step": best_step, "stopped": trainer.stopped, "batch": args.batch, "lr": args.lr,
            "unroll": args.unroll, "aux_layers": list(layers), "draft_vocab": head.cfg.draft_vocab, "vocab": V,
            "train_prompts": len(train_pool.lens_np), "sampled_answers": train_pool.sampled, "answer_tokens": n_tok,
            "eval_prompts": len(eval_pool.lens_np), "pool_seconds": round(pool_s, 1), "train_seconds": round(train_s, 1),
            "steps_per_s": round(steps / max(1e-6, train_s), 2), "hardware": hardware(target.device),
            "before": before, "agreement": final["agree"], "chain_accept": final["chain_accept"], "kl": final["kl"]}
    drafter = Eagle3HeadDrafter(head, target, Path(args.out).resolve().name, {"trained": True})
    out = save(drafter, args.out, info, trainer.curve, t_run)
    if args.engine_eval:
        info["engine"] = engine_check(out, target, args)
        log(f"[eagle3] engine on {args.engine_eval} held-out describe prompts: {info['engine']}")
        save(drafter, out, info, trainer.curve, t_run)
    log(f"[eagle3] {steps} steps ({trainer.stopped}) in {train_s:.0f}s; best at step {best_step}: agree "
        f"{final['agree']} chain {final['chain_accept']}; saved {out} ({time.time() - t_run:.0f}s in all)")
    return info


def save(drafter: Eagle3HeadDrafter, out, info: dict, curve: list[dict], t_run: float) -> Path:
    info["run_seconds"] = round(time.time() - t_run, 1)
    path = save_mmspec_head(drafter, out, {"trained": True, "training": info, "curve": curve,
                                           "agreement": info["agreement"], "steps": info["steps"]})
    write_card(path, drafter, info, curve)
    return path


def engine_check(path: Path, target, args) -> dict:
    """The saved directory (bf16 weights, as --drafter loads it) through the engine on held-out describe
    prompts: greedy output == vanilla, tau, speed-up."""
    from mmspec import load_drafter
    from mmspec.world import held_out_seeds

    seeds = held_out_seeds(args.engine_eval, HELD_OUT_OFFSET + 100_000)
    try:
        return engine_eval(load_drafter(str(path), target), target, seeds, args.engine_tree, args.engine_max_new, {})
    except Exception as e:  # noqa: BLE001 - a failed check is reported in the card; the head is saved
        return {"error": f"{type(e).__name__}: {e}"}


def engine_lines(e: dict | None) -> list[str]:
    if not e:
        return []
    if "error" in e:
        return [f"- Engine check failed: {e['error']}"]
    return [f"- Engine, `{e['tree']}` on {e['prompts']} held-out describe prompts ({e['max_new_tokens']} new tokens, "
            f"greedy): tau {e['tau']}, output identical to vanilla: {e['lossless_check']}, "
            f"{e['speedup_vs_vanilla']}x vanilla's wall time."]


def write_card(path: Path, drafter: Eagle3HeadDrafter, info: dict, curve: list[dict]) -> None:
    c, name = drafter.head.cfg, path.resolve().name  # where it was trained is not where it will be loaded from
    n_params = sum(p.numel() for p in drafter.head.parameters())
    rows = [f"| {r['step']} | {r['seconds']} | {r['train_loss']} | {r['kl']} | "
            f"{' / '.join(f'{100 * a:.1f}%' for a in r['agree'])} | {r['chain_accept']} |" for r in curve]
    b = info["before"]
    text = [
        f"# {name}",
        "",
        f"EAGLE-3 head in the vLLM / SGLang / SpecForge format (`LlamaForCausalLMEagle3`) for `{Path(drafter.target.name).name}`, "
        "trained by `python -m mmspec.train_eagle3`. Load with `--drafter " + f"path/to/{name}`; "
        f"`python -m mmspec export-eagle3 path/to/{name} OUT` writes the clean head directory vLLM / SGLang serve.",
        "",
        "## Architecture",
        "",
        f"- One decoder layer of width {c.hidden}, {c.heads} heads ({c.kv_heads} KV heads, head_dim {c.head_dim}), "
        f"MLP {c.intermediate}; q/k/v over [norm(embed(token)), norm(fc(aux))] (2 x {c.hidden}).",
        f"- fc over the target's hidden_states {list(c.aux)} concatenated lowest first (3 x {c.target_hidden} -> {c.hidden}); "
        "config.json names them both ways (vLLM's top-level ids, SGLang's eagle_config ids minus one).",
        f"- Draft vocabulary {c.draft_vocab} of {c.vocab} target ids (d2t); the target's embeddings are shared (no embed_tokens).",
        f"- {n_params / 1e6:.2f}M trainable parameters, stored in bfloat16.",
        "",
        "## Training",
        "",
        f"- Self-distillation: the target answered {info['train_prompts']} synthetic-world prompts "
        f"({info['train_prompts'] - info['sampled_answers']} greedy, {info['sampled_answers']} sampled at T=1; "
        f"{info['answer_tokens']} answer tokens) in {info['pool_seconds']} s; the head learns the target's next-token "
        "distributions on them (KL over the draft vocabulary, renormalised).",
        f"- Training-time test: {info['unroll']} unrolled steps on the head's own states, loss weights 0.8^j; "
        f"batch {info['batch']}, AdamW lr {info['lr']} (warm-up, cosine over the time budget), one frozen target "
        "forward per batch (bf16 autocast on GPU).",
        f"- {info['steps']} steps in {info['train_seconds']} s ({info['steps_per_s']} steps/s), stopped by: "
        f"{info['stopped']}; saved the best evaluation (step {info['best_step']}). Whole run {info['run_seconds']} s "
        f"on {info['hardware']}.",
        "",
        "## Measured quality (held-out prompts)",
        "",
        f"Teacher-forced on the target's greedy answers to {info['eval_prompts']} held-out prompts "
        "(`world.held_out_seeds`): top-1 agreement with the target by draft depth, and the implied mean accepted "
        "length of a chain.",
        "",
        f"- Before training: agreement {' / '.join(f'{100 * a:.1f}%' for a in b['agree'])}, KL {b['kl']}.",
        f"- Saved head: agreement {' / '.join(f'{100 * a:.1f}%' for a in info['agreement'])} (depth 1 / 2 / ...), "
        f"KL {info['kl']}, chain of {info['unroll']}: {info['chain_accept']} accepted drafts per step.",
        *engine_lines(info.get("engine")),
        "",
        "| step | seconds | train loss | held-out KL | agreement by depth | chain accept |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    (path / "README.md").write_text("\n".join(text))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
