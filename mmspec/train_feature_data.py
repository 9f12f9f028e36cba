"""Data for mmspec.train_feature: world prompts, the target's own answers, and a device-resident cache
of everything the target pass gives (hidden states, logits, last-layer KV, saliency, entry plans).

Why a cache: the feature drafters are tiny (about 1M parameters); a training step on the GPU is
bound by host work (the target forward's launches, per-sample plan building, host-device round
trips), not by arithmetic. Each pool sample is run through the target once, when the pool is built;
every later step gathers its rows from device tensors with index arithmetic and host-known shapes,
so a step has no per-sample Python and no host sync.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from mmspec import entropy
from mmspec.drafters.feature.plan import TEXT, image_grid, plan_entries

TEXT_FRAC = 0.1  # share of image questions asked without their image (MSD's text-only stage uses them)


def round_up(n: int, m: int = 32) -> int:
    """Padded sizes: few distinct shapes (the allocator and kernels see the same ones again)."""
    return (int(n) + m - 1) // m * m


# ------------------------------------------------------------------------------------------------
# Prompts (and the ground-truth answers, used where no target answer is wanted)


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
                "with_image": with_image, "size": img.size, "kind": qa.kind, "seed": seed}


class Collate:
    def __init__(self, pad_id: int):
        self.pad = pad_id

    def __call__(self, items):
        T = round_up(max(len(it["ids"]) for it in items))
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


def pad_id(target) -> int:
    return target.tokenizer.pad_token_id if target.tokenizer.pad_token_id is not None else 0


def item_loader(target, seeds, batch, workers, max_answer):
    """Batches of WorldData items (lists, uncollated: generation re-pads the prompts on the left)."""
    kw = dict(prefetch_factor=4) if workers > 0 else {}
    return torch.utils.data.DataLoader(WorldData(target, seeds, max_answer), batch_size=batch, shuffle=False,
                                       num_workers=workers, collate_fn=list, **kw)


# ------------------------------------------------------------------------------------------------
# The target's own answers (self-distillation pool)


@torch.no_grad()
def target_answers(target, items, max_new: int, sample: bool) -> list[list[int]]:
    """The target's answers to the items' prompts: greedy, or sampled at T=1 (left-padded generate)."""
    dev, pad = target.device, pad_id(target)
    prompts = [it["ids"][: it["P"]] for it in items]
    L = max(len(p) for p in prompts)
    ids = torch.full((len(items), L), pad, dtype=torch.long)
    att = torch.zeros((len(items), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        att[b, L - len(p):] = 1
    pvs = [it["pv"] for it in items if it["pv"] is not None]
    kw = {"pixel_values": torch.cat(pvs).to(dev, target.dtype)} if pvs else {}
    eos = target.tokenizer.eos_token_id
    image_id = getattr(target.model.config, "image_token_id", None)
    mode = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    out = target.model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=max_new,
                                eos_token_id=eos, pad_token_id=pad, **mode, **kw)
    answers = []
    for row in out[:, L:].tolist():  # once per generated chunk, not per training step
        ans = []
        for t in row:
            if t == image_id:  # an untrained target may say it: the answer ends before it (one image span)
                break
            ans.append(t)
            if t == eos:
                break
        answers.append(ans)
    return answers


def with_answers(items, answers):
    """Items whose answer part is replaced by the target's own answer."""
    return [dict(it, ids=it["ids"][: it["P"]] + a) for it, a in zip(items, answers)]


# ------------------------------------------------------------------------------------------------
# Target pass over a collated batch: what the cache keeps


def image_spans(ids: torch.Tensor, image_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row: first image-token index (-10 without image) and the number of image tokens."""
    if image_id is None:
        return np.full(ids.shape[0], -10), np.zeros(ids.shape[0], dtype=np.int64)
    hit = (ids == image_id).numpy()
    nv = hit.sum(1)
    v0 = np.where(nv > 0, hit.argmax(1), -10)
    return v0.astype(np.int64), nv.astype(np.int64)


def post_image_queries(v0, nv, hi):
    """[B, Tq] positions (and mask) of text after the image up to hi[b] (exclusive)."""
    lo = np.where(nv > 0, v0 + nv, 1)
    hi = np.maximum(hi, lo + 1)
    Tq = int((hi - lo).max())
    q = lo[:, None] + np.arange(Tq)[None]
    m = q < hi[:, None]
    return torch.from_numpy(np.where(m, q, 0)), torch.from_numpy(m)


def batch_saliency(target, hs, keys, v0, nv, P):
    """[B, n_vis] attention received by each visual token in the target's last layer (prompt queries)."""
    n = int(nv.max()) if len(nv) else 0
    if n == 0:
        return None
    L = entropy.num_layers(target.model)
    dev = target.device
    q, m = post_image_queries(v0, nv, P)
    q, m = q.to(dev), m.to(dev)
    h_in = hs[L - 1].gather(1, q[..., None].expand(-1, -1, hs[L - 1].shape[-1]))
    vs = torch.from_numpy(np.maximum(v0, 0)).to(dev)
    return entropy.visual_saliency(target.model, h_in, keys, q, q, m, vs, n)


def batch_entropy(target, batch) -> list[float]:
    """Attention-entropy profile of the target over post-image text (DREAM's layer choice)."""
    out = forward(target, batch, use_cache=True)
    v0, nv = image_spans(batch["input_ids"], getattr(target.model.config, "image_token_id", None))
    q, m = post_image_queries(v0, nv, batch["len"].numpy())
    B, T = batch["input_ids"].shape
    qmask = torch.zeros(B, T, dtype=torch.bool)
    qmask[torch.arange(B)[:, None].expand_as(q)[m], q[m]] = True
    pos = torch.arange(T, device=target.device)[None].expand(B, -1)
    keys = [layer.keys for layer in out.past_key_values.layers]
    return entropy.entropy_profile(target.model, out.hidden_states, keys, pos, qmask)


@torch.no_grad()
def forward(target, batch, use_cache: bool):
    dev = target.device
    kw = {}
    if batch["pixel_values"] is not None:
        kw["pixel_values"] = batch["pixel_values"].to(dev, target.dtype)
    return target.model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                        output_hidden_states=True, use_cache=use_cache, **kw)


# ------------------------------------------------------------------------------------------------
# The cache


def _pad_cat(parts: list[torch.Tensor], dim: int, T: int) -> torch.Tensor:
    """Concatenate along dim 0 after right-padding dimension `dim` to T (zeros)."""
    out = []
    for p in parts:
        pad = [0, 0] * (p.dim() - 1 - dim) + [0, T - p.shape[dim]]
        out.append(torch.nn.functional.pad(p, pad))
    return torch.cat(out)


class FeatureCache:
    """Target outputs of a set of sequences, on the target's device (see the module docstring).

    Per sample i: token ids, prompt length P, length, image span (v0, nv) and grid, hidden states of
    the requested layers [N, T, H], the target's logits at answer positions q in [P, len - 2] (flat,
    sample-major, from row off[i]), optionally one layer's KV cache (AASD) and visual saliency (top-k)."""

    def __init__(self, target, need: dict):
        self.target, self.need = target, need
        self.image_id = getattr(target.model.config, "image_token_id", None)
        self.kv_layer = need.get("kv_layer", -1) % entropy.num_layers(target.model)
        self._parts: list[dict] = []
        self.plans: dict = {}

    def add(self, batch) -> None:
        """Run the target once over a collated batch and keep what the drafters read."""
        need, L = self.need, entropy.num_layers(self.target.model)
        cache_needed = need["cache"] or need["saliency"]
        out = forward(self.target, batch, use_cache=cache_needed)
        v0, nv = image_spans(batch["input_ids"], self.image_id)
        P, ln = batch["P"].numpy(), batch["len"].numpy()
        T = batch["input_ids"].shape[1]
        pos = np.arange(T)[None]
        sel = torch.from_numpy((pos >= P[:, None]) & (pos <= ln[:, None] - 2))
        part = {"ids": batch["input_ids"], "P": P, "len": ln, "v0": v0, "nv": nv,
                "with_image": batch["with_image"].numpy(), "sizes": list(batch["sizes"]), "kinds": list(batch["kinds"]),
                "hs": {i: out.hidden_states[i] for i in need["layers"]},
                "logits": out.logits[sel.to(out.logits.device)], "n_logits": sel.sum(1).numpy()}
        if need["cache"]:
            layer = out.past_key_values.layers[self.kv_layer]
            part["keys"], part["values"] = layer.keys, layer.values
        if need["saliency"]:
            part["saliency"] = batch_saliency(self.target, out.hidden_states,
                                              out.past_key_values.layers[L - 1].keys, v0, nv, P)
        self._parts.append(part)

    def finish(self) -> "FeatureCache":
        """Concatenate the added batches (padded to the longest sequence) into the cache's tensors."""
        parts, self._parts = self._parts, []
        cat = lambda k: np.concatenate([p[k] for p in parts])  # noqa: E731
        self.P, self.len, self.v0, self.nv, self.with_image = (cat(k) for k in ("P", "len", "v0", "nv", "with_image"))
        self.n = len(self.P)
        self.T = max(p["ids"].shape[1] for p in parts)
        self.ids = _pad_cat([p["ids"] for p in parts], 1, self.T)
        self.sizes = [s for p in parts for s in p["sizes"]]
        self.kinds = [k for p in parts for k in p["kinds"]]
        # One layer at a time, dropping the parts' copies as they are joined: the peak stays near one cache.
        self.hs = {i: _pad_cat([p["hs"].pop(i) for p in parts], 1, self.T) for i in self.need["layers"]}
        self.logits = torch.cat([p.pop("logits") for p in parts])
        self.off = np.concatenate([[0], np.cumsum(cat("n_logits"))[:-1]]).astype(np.int64)
        if self.need["cache"]:
            self.keys = _pad_cat([p.pop("keys") for p in parts], 2, self.T)
            self.values = _pad_cat([p.pop("values") for p in parts], 2, self.T)
        self.saliency = None
        if self.need["saliency"]:
            nmax = max((p["saliency"].shape[1] for p in parts if p["saliency"] is not None), default=0)
            self.saliency = np.zeros((self.n, nmax), dtype=np.float32)
            row = 0
            for p in parts:
                if p["saliency"] is not None:
                    s = p["saliency"].float().cpu().numpy()
                    self.saliency[row: row + len(s), : s.shape[1]] = s
                row += len(p["P"])
        dev = self.target.device
        t = lambda a: torch.from_numpy(np.asarray(a)).to(dev)  # noqa: E731
        self.d = {"P": t(self.P), "len": t(self.len), "v0": t(self.v0), "nv": t(self.nv),
                  "with_image": t(self.with_image), "off": t(self.off)}
        self.grids = [image_grid(int(n), s) if n else None for n, s in zip(self.nv, self.sizes)]
        return self

    def plan(self, cfg) -> "PlanTable":
        key = plan_key(cfg)
        if key not in self.plans:
            self.plans[key] = PlanTable(self, cfg)
        return self.plans[key]

    def view(self, idx: np.ndarray) -> "Batch":
        return Batch(self, np.asarray(idx, dtype=np.int64))


def plan_key(cfg) -> tuple:
    """The FeatConfig fields that shape the drafter's entries."""
    return (cfg.compress, cfg.pool, cfg.topk_keep, cfg.queries, cfg.aasd)


# ------------------------------------------------------------------------------------------------
# Entry plans of every cached sample (built once, with the inference code's plan_entries)


def _entry_arrays(entries, m: int) -> dict[str, np.ndarray]:
    """Field arrays of a plan (whole-list conversions: this runs once per top-k sample)."""
    src = np.array([e.src for e in entries], np.int64)
    a = {"src": src, "rope": np.array([e.rope for e in entries], np.int64),
         "kind": np.array([e.kind for e in entries], np.int64),
         "slot": np.array([max(e.slot, 0) for e in entries], np.int64),
         "post": np.array([e.post for e in entries], bool),
         "mem": np.repeat(src[:, None], m, 1), "memw": np.zeros((len(entries), m), np.float32)}
    a["memw"][:, 0] = 1.0
    if m > 1:  # pooled entries: members, equal weights; padding members repeat src with weight 0
        for e, en in enumerate(entries):
            a["mem"][e, : len(en.members)] = en.members
            a["memw"][e, : len(en.members)] = 1.0 / len(en.members)
    return a


class PlanTable:
    """Entries (mmspec.drafters.feature.plan.plan_entries) of every cached sample for one plan layout,
    as device tensors [n, Te]; host copies of the per-sample sizes give batch shapes without syncs.

    Entries' source positions increase along a plan, so the plan of a sequence of N positions is a
    prefix of the plan of the longest one: samples with the same layout (image span, grid, own_from)
    share one plan_entries call. Top-k plans depend on each sample's saliency: one call per sample."""

    def __init__(self, cache: FeatureCache, cfg):
        self.m = cfg.pool ** 2 if cfg.compress == "pool" else 1
        per = []
        shared: dict = {}
        Nmax = cache.T - 1
        for i in range(cache.n):
            span = (int(cache.v0[i]), int(cache.nv[i])) if cache.nv[i] else None
            own_from = int(cache.P[i]) - 1 if cfg.aasd else 0
            # The prefix rule holds once the whole image span is in (always, with text after the image).
            N = Nmax if span is None or cache.len[i] - 1 >= sum(span) - 1 else int(cache.len[i]) - 1
            if (cfg.compress == "topk" and span is not None) or N < Nmax:
                topk = cfg.compress == "topk" and span is not None and cache.saliency is not None
                sal = cache.saliency[i, : span[1]].tolist() if topk else None
                per.append(_entry_arrays(plan_entries(N, span, cache.grids[i], cfg, sal, own_from)[0], self.m))
                continue
            key = (span, cache.grids[i], own_from)
            if key not in shared:
                shared[key] = _entry_arrays(plan_entries(Nmax, span, cache.grids[i], cfg, None, own_from)[0], self.m)
                assert np.all(np.diff(shared[key]["src"]) > 0), "plan entries must follow source positions"
            per.append(shared[key])
        # Prefix of length n_ent: the entries whose source position exists (src < N = len - 1).
        self.n_ent = np.array([np.searchsorted(a["src"], n - 1) for a, n in zip(per, cache.len)], dtype=np.int64)
        Te = round_up(max(1, self.n_ent.max()))
        arr = {k: np.zeros((cache.n, Te) + v.shape[1:], v.dtype) for k, v in per[0].items()}
        arr["kind"][:] = -1
        for i, (a, n) in enumerate(zip(per, self.n_ent)):
            for k in arr:
                arr[k][i, :n] = a[k][:n]
        # First entry with a loss (text, src >= P - 1): the unrolled steps start J entries before it.
        ok = (arr["kind"] == TEXT) & (arr["src"] >= cache.P[:, None] - 1)
        self.first = np.where(ok.any(1), ok.argmax(1), self.n_ent).astype(np.int64)
        dev = cache.target.device
        self.d = {k: torch.from_numpy(v).to(dev) for k, v in arr.items()}
        self.d["n_ent"] = torch.from_numpy(self.n_ent).to(dev)
        self.d["first"] = torch.from_numpy(self.first).to(dev)
        self.pooled = cfg.compress == "pool"


# ------------------------------------------------------------------------------------------------
# One training batch: gathered rows, host-known shapes


@dataclass
class PlanView:
    src: torch.Tensor
    rope: torch.Tensor
    kind: torch.Tensor
    slot: torch.Tensor
    post: torch.Tensor
    mem: torch.Tensor | None  # [B, Te, m] members of pooled entries
    memw: torch.Tensor | None
    R: torch.Tensor  # [B, Tq1] entry rows of the unrolled steps (and of every loss term)
    rv: torch.Tensor  # [B, Tq1] real rows
    Te: int


class Batch:
    """Rows idx of a FeatureCache, cut to the batch's longest sequence (a shape known on the host)."""

    def __init__(self, cache: FeatureCache, idx: np.ndarray):
        self.cache, self.idx_np = cache, idx
        dev = self.dev = cache.target.device
        self.idx = torch.from_numpy(idx).to(dev, non_blocking=True)
        self.B = len(idx)
        self.T = T = min(cache.T, round_up(cache.len[idx].max()))
        d = {k: v.index_select(0, self.idx) for k, v in cache.d.items()}
        self.P, self.len, self.off, self.with_image = d["P"], d["len"], d["off"], d["with_image"]
        self.hs = {i: h.index_select(0, self.idx)[:, :T] for i, h in cache.hs.items()}
        self.logits = cache.logits
        self._dist = None  # the target's distributions at answer positions, built on first use
        self.keys = cache.keys.index_select(0, self.idx)[:, :, :T] if cache.need["cache"] else None
        self.values = cache.values.index_select(0, self.idx)[:, :, :T] if cache.need["cache"] else None
        # Drafter position p is visual when token p + 1 is an image token.
        p = torch.arange(T - 1, device=dev)[None]
        v0, nv = d["v0"][:, None], d["nv"][:, None]
        self.vis = (p + 1 >= v0) & (p + 1 < v0 + nv)
        n = int(cache.nv[idx].max())
        hs0 = self.hs[0]
        if n:
            pos = (v0.clamp_min(0) + torch.arange(n, device=dev)[None]).clamp(max=T - 1)
            self.img_emb = hs0.gather(1, pos[..., None].expand(-1, -1, hs0.shape[-1]))
        else:
            self.img_emb = torch.zeros(self.B, 1, hs0.shape[-1], device=dev, dtype=hs0.dtype)

    def target_dist(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The target's distribution at every answer position [B, T], built once per batch for every
        variant and unroll step: probabilities, sum p log p (KL = that - sum p log q), top-1 token.
        Zero off the answers."""
        if self._dist is None:
            B, T = self.B, self.T
            pos = torch.arange(T, device=self.dev)[None]
            at = (pos >= self.P[:, None]) & (pos <= self.len[:, None] - 2)
            row = (self.off[:, None] + pos - self.P[:, None]).clamp(0, self.logits.shape[0] - 1)
            logp = torch.log_softmax(self.logits.index_select(0, row.reshape(-1)).float(), -1).view(B, T, -1)
            logp = torch.where(at[..., None], logp, torch.zeros_like(logp))
            prob = logp.exp() * at[..., None]
            self._dist = (prob, (prob * logp).sum(-1), logp.argmax(-1))
        return self._dist

    def plan(self, cfg) -> PlanView:
        """The entries of this batch for cfg, and the rows its unrolled steps run on."""
        tab = self.cache.plan(cfg)
        idx = self.idx
        n_ent, first = tab.n_ent[self.idx_np], tab.first[self.idx_np]
        Te = round_up(n_ent.max())
        g = {k: v.index_select(0, idx)[:, :Te] for k, v in tab.d.items() if k not in ("n_ent", "first")}
        J = max(1, cfg.unroll)
        # Unrolled steps j >= 1 and the loss terms only matter from J entries before a sample's first
        # loss entry to its last entry: rows R, padded to a common length (rv = real rows).
        start_np = np.maximum(0, first - J)
        Tq1 = min(Te, round_up(max(1, (n_ent - start_np).max())))
        start = (tab.d["first"].index_select(0, idx) - J).clamp_min(0)
        R = start[:, None] + torch.arange(Tq1, device=self.dev)[None]
        rv = R < tab.d["n_ent"].index_select(0, idx)[:, None]
        return PlanView(g["src"], g["rope"], g["kind"], g["slot"], g["post"],
                        g["mem"] if tab.pooled else None, g["memw"] if tab.pooled else None,
                        R.clamp(max=Te - 1), rv, Te)


def cache_from_batch(target, batch, need: dict) -> Batch:
    """A one-batch cache (tests and the reference comparison): the batch's rows, in order."""
    c = FeatureCache(target, need)
    c.add(batch)
    c.finish()
    return c.view(np.arange(c.n))
