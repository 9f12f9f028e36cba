"""Train the embedded default models on the synthetic world (mmspec.world).

    python -m mmspec.train all       --out assets/models --seed 0 --device cuda
    python -m mmspec.train tokenizer --out assets/models            # BPE + processor only
    python -m mmspec.train target    --out assets/models --device cuda --steps-target N
    python -m mmspec.train drafters  --out assets/models --device cuda --steps-draft N
    python -m mmspec.train all --smoke --out /tmp/mm                # tiny CPU run, < 60 s

Writes ``OUT/mmspec-target`` (LlavaForConditionalGeneration + processor),
``OUT/mmspec-draft-vlm`` (same architecture, 2 text layers, distilled) and
``OUT/mmspec-draft-text`` (LlamaForCausalLM, 2 layers, text only, distilled),
each in float16 safetensors with a README.md model card and train_log.json.

``--time-budget-min`` bounds each stage's wall time (target; drafters): once the
measured throughput shows the planned steps will not fit, the step count (and
the cosine schedule) is shortened so that the stage still ends annealed and
saved in time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from mmspec.world import (
    CELL,
    CHAT_TEMPLATE,
    COLOR_NAMES,
    SHAPES,
    SIZES,
    TEXT_VALUES,
    QA_KINDS,
    QA_WEIGHTS,
    format_answer,
    format_prompt,
    make_qa,
    render,
    sample_example,
    sample_scene,
)

TARGET_NAME = "mmspec-target"
DRAFT_VLM_NAME = "mmspec-draft-vlm"
DRAFT_TEXT_NAME = "mmspec-draft-text"
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]  # ids 0..4
PATCH = 16
IMAGE = 224
N_IMAGE_TOKENS = (IMAGE // PATCH) ** 2  # 196

# Seed ranges (all < 10**9; held-out evaluation uses >= 10**9).
TARGET_SEED_BASE = 0  # .. 500M
POOL_SEED_BASE = 500_000_000  # .. 700M  (prompts answered by the target for distillation)
DISTILL_SEED_BASE = 700_000_000  # .. 900M (fresh ground-truth batches during distillation)
TOKENIZER_SEED_BASE = 900_000_000
EVAL_LOSS_SEED_BASE = 10**9 + 300_000_000  # held-out, disjoint from world_eval's seeds


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------
# Tokenizer / processor
# ---------------------------------------------------------------------------


def build_tokenizer(n_samples: int = 40000, vocab_size: int = 3000):
    """Byte-level BPE trained on generated prompts + answers (chat-formatted)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def corpus():
        for i in range(n_samples):
            rng = random.Random(TOKENIZER_SEED_BASE + i)
            scene = sample_scene(rng)
            qa = make_qa(scene, rng)
            yield format_prompt(qa.prompt, qa.needs_image) + format_answer(qa.answer) + "\n"

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _image_processor():
    try:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as IP
    except ImportError:  # older transformers
        from transformers import SiglipImageProcessor as IP
    return IP(size={"height": IMAGE, "width": IMAGE})


def build_processor(tokenizer):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )


def token_ids(tokenizer) -> dict:
    t = tokenizer
    return {
        "unk": t.unk_token_id,
        "pad": t.pad_token_id,
        "bos": t.bos_token_id,
        "eos": t.eos_token_id,
        "image": t.convert_tokens_to_ids("<image>"),
        "vocab": len(t),
    }


# ---------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------

REAL = {
    "text": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=2),
    "vision": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3),
    "draft_layers": 2,
}
SMOKE = {
    "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    "draft_layers": 1,
}


def text_config(ids, spec, n_layers=None):
    from transformers import LlamaConfig

    kw = dict(spec["text"])
    if n_layers is not None:
        kw["num_hidden_layers"] = n_layers
    return LlamaConfig(
        vocab_size=ids["vocab"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        rope_theta=10000.0,
        **kw,
    )


def vlm_config(ids, spec, n_text_layers=None):
    from transformers import LlavaConfig, SiglipVisionConfig

    vc = SiglipVisionConfig(image_size=IMAGE, patch_size=PATCH, num_channels=3, vision_use_head=False, **spec["vision"])
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=text_config(ids, spec, n_text_layers),
        image_token_id=ids["image"],
        image_seq_length=N_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    cfg.pad_token_id = ids["pad"]
    return cfg


def n_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def set_generation_defaults(model, ids):
    gc = model.generation_config
    gc.bos_token_id = ids["bos"]
    gc.eos_token_id = ids["eos"]
    gc.pad_token_id = ids["pad"]
    gc.do_sample = False
    gc.max_new_tokens = 320


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


class Encoder:
    """Fast path equivalent to processor(apply_chat_template(...)) (tests check it)."""

    def __init__(self, tokenizer_json: str, image_id: int):
        self.tokenizer_json = tokenizer_json
        self.image_id = image_id
        self._tok = None

    @property
    def tok(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(self.tokenizer_json)
        return self._tok

    def __getstate__(self):
        return {"tokenizer_json": self.tokenizer_json, "image_id": self.image_id, "_tok": None}

    def prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        ids = self.tok.encode(format_prompt(prompt, with_image), add_special_tokens=False).ids
        if with_image:
            i = ids.index(self.image_id)
            ids = ids[:i] + [self.image_id] * N_IMAGE_TOKENS + ids[i + 1:]
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        return self.tok.encode(format_answer(answer), add_special_tokens=False).ids


AUX_HEADS = (("color", len(COLOR_NAMES) + 1), ("shape", len(SHAPES) + 1), ("size", len(SIZES) + 1),
             ("text", len(TEXT_VALUES) + 1), ("cell", 9))
AUX_DIM = sum(n for _, n in AUX_HEADS)


def patch_labels(scene) -> np.ndarray:
    """Per-patch targets (5, 196) for the auxiliary vision loss: the attributes of the
    object in the grid cell that contains the patch centre (0 = empty cell), and the cell."""
    g = IMAGE // PATCH
    out = np.zeros((len(AUX_HEADS), g * g), dtype=np.int64)
    by_cell = {tuple(o.cell): o for o in scene.objects}
    for i in range(g):
        for j in range(g):
            r, c = int((i + 0.5) * PATCH // CELL), int((j + 0.5) * PATCH // CELL)
            k = i * g + j
            out[4, k] = r * 3 + c
            o = by_cell.get((r, c))
            if o is not None:
                out[0, k] = COLOR_NAMES.index(o.color) + 1
                out[1, k] = SHAPES.index(o.shape) + 1
                out[2, k] = SIZES.index(o.size) + 1
                out[3, k] = TEXT_VALUES.index(o.text) + 1 if o.text else 0
    return out


def encode_example(enc: Encoder, seed: int, max_answer: int = 400, kind: str | None = None) -> dict:
    img, qa, scene = sample_example(seed, kind)
    with_image = qa.needs_image or random.Random(seed ^ 0x5EED).random() < 0.5
    return {
        "aux": patch_labels(scene) if with_image else None,
        "seed": seed,
        "kind": QA_KINDS.index(qa.kind),
        "with_image": with_image,
        "image": np.asarray(img, dtype=np.uint8) if with_image else None,
        "prompt": enc.prompt_ids(qa.prompt, with_image),
        "prompt_text": enc.prompt_ids(qa.prompt, False),
        "answer": enc.answer_ids(qa.answer)[:max_answer],
    }


class WorldDataset(torch.utils.data.Dataset):
    """Example i is sample_example(base + i): generated on the fly in workers.

    With `batch_size` and `qa_weights`, each batch of consecutive indices holds either only
    descriptions or only short questions (the kind drawn per batch / per example from the weights):
    a batch is padded to its longest answer, and a 200-token description in a batch of one-line
    answers would more than double the batch's cost.
    """

    def __init__(self, enc: Encoder, base: int, length: int, batch_size: int | None = None,
                 qa_weights: dict[str, float] | None = None):
        self.enc, self.base, self.length = enc, base, length
        self.batch_size, self.qa_weights = batch_size, qa_weights

    def __len__(self):
        return self.length

    def kind_of(self, i: int) -> str | None:
        if not self.batch_size or not self.qa_weights:
            return None
        w = self.qa_weights
        total = sum(w.values())
        if random.Random(self.base * 7919 + i // self.batch_size).random() < w.get("describe", 0.0) / total:
            return "describe"
        others = [k for k in QA_KINDS if k != "describe" and w.get(k, 0.0) > 0]
        return random.Random((self.base + i) ^ 0xB0C4E7).choices(others, weights=[w[k] for k in others])[0]

    def __getitem__(self, i):
        return encode_example(self.enc, self.base + i, kind=self.kind_of(i))


def parse_qa_weights(text: str | None) -> dict[str, float]:
    """'describe=0.2,shape=0.15' -> QA_WEIGHTS with those kinds changed."""
    weights = dict(QA_WEIGHTS)
    for part in filter(None, (text or "").split(",")):
        kind, _, value = part.partition("=")
        kind = kind.strip()
        if kind not in QA_WEIGHTS:
            raise SystemExit(f"--qa-weights: unknown kind {kind!r}; kinds: {', '.join(QA_KINDS)}")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise SystemExit(f"--qa-weights: {part!r} is not kind=number") from None
        if weights[kind] < 0:
            raise SystemExit(f"--qa-weights: {kind} must be >= 0")
    if sum(weights.values()) <= 0:
        raise SystemExit("--qa-weights: all weights are zero")
    return weights


class PoolDataset(torch.utils.data.Dataset):
    """Target-generated answers: items are dicts with seed, with_image, prompt, prompt_text, answer."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        it = dict(self.items[i])
        if it["with_image"]:
            it["image"] = np.asarray(render(sample_scene(random.Random(it["seed"]))), dtype=np.uint8)
        else:
            it["image"] = None
        return it


def _pad_to(n, m=8):
    return (n + m - 1) // m * m


class Collate:
    def __init__(self, pad_id: int, with_text: bool = False):
        self.pad_id, self.with_text = pad_id, with_text

    def _build(self, batch, key):
        seqs = [b[key] + b["answer"] for b in batch]
        T = _pad_to(max(len(s) for s in seqs))
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), T), -100, dtype=torch.long)
        for i, (b, s) in enumerate(zip(batch, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            p = len(b[key])
            labels[i, p: len(s)] = torch.tensor(b["answer"])
        return ids, labels

    def __call__(self, batch):
        ids, labels = self._build(batch, "prompt")
        imgs = [b["image"] for b in batch if b["with_image"]]
        out = {
            "input_ids": ids,
            "labels": labels,
            "images": torch.from_numpy(np.stack(imgs)) if imgs else None,  # uint8 NHWC
            "kind": torch.tensor([b.get("kind", -1) for b in batch]),
        }
        aux = [b.get("aux") for b in batch if b["with_image"]]
        if imgs and all(a is not None for a in aux):
            out["aux"] = torch.from_numpy(np.stack(aux))  # (n_img, 5, 196)
        if self.with_text:
            out["text_ids"], out["text_labels"] = self._build(batch, "prompt_text")
        return out


def pixel_values(images_u8, device, dtype=torch.float32):
    """uint8 NHWC -> normalised NCHW, identical to SiglipImageProcessor at 224x224."""
    if images_u8 is None:
        return None
    x = images_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).to(dtype)
    return (x / 255.0 - 0.5) / 0.5


def make_loader(ds, batch_size, num_workers, collate, shuffle=False, seed=0):
    kw = {}
    if num_workers > 0:
        kw = dict(prefetch_factor=4, persistent_workers=False)
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        generator=g,
        **kw,
    )


# ---------------------------------------------------------------------------
# Training utilities
# ---------------------------------------------------------------------------


class Schedule:
    """Linear warm-up then cosine to ``floor``; ``total`` may shrink during training."""

    def __init__(self, total, warmup, floor=0.1):
        self.total, self.warmup, self.floor = total, warmup, floor

    def __call__(self, step):
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))


class Budget:
    """Shrinks the planned step count when the wall-time budget would be exceeded."""

    def __init__(self, minutes, t0, reserve_s):
        self.deadline = None if not minutes else t0 + 60 * minutes - reserve_s
        self.t0 = t0

    def plan(self, step, total, t_step0, step0, cap=None) -> int:
        """Return the new total given that `step` steps ran since (t_step0, step0).
        The total only shrinks, except early on (first 15%) when it may grow up to `cap`."""
        if self.deadline is None or step <= step0:
            return total
        rate = (step - step0) / max(1e-6, time.time() - t_step0)
        fit = step + int((self.deadline - time.time()) * rate)
        upper = max(total, cap) if (cap and step < 0.15 * total) else total
        return max(step + 1, min(upper, fit))

    def over(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline


def hardware(device) -> str:
    if device.type == "cuda":
        return f"1x {torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores"
    return f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def shifted(logits, labels):
    """Logits predicting supervised tokens, and those tokens: (N, V), (N,)."""
    lg = logits[:, :-1]
    lb = labels[:, 1:]
    m = lb != -100
    return lg[m], lb[m], m


def lm_loss(logits, labels, sample_weight=0.5):
    """(1 - w) * token-mean CE + w * per-example-mean CE (so short answers, whose few
    tokens carry the visual facts, are not drowned by long descriptions)."""
    lg, lb = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(lg.float().transpose(1, 2), lb, ignore_index=-100, reduction="none")  # (B, T)
    m = (lb != -100).float()
    n = m.sum(1)
    tok = (ce * m).sum() / n.sum().clamp(min=1)
    if sample_weight <= 0:
        return tok
    per = (ce * m).sum(1) / n.clamp(min=1)
    ex = per[n > 0].mean()
    return (1 - sample_weight) * tok + sample_weight * ex


def _rms(x):
    return x.float().pow(2).mean(-1).add(1e-6).sqrt()


def feature_scale_penalty(h, f, h_max=4.0, f_max=1.0):
    """Keeps the vision tower's last hidden state (no final norm in LLaVA's feature path)
    and the projected image tokens at a sane scale: unchecked, they grow by ~100x and the
    per-patch differences vanish in the LLM's RMSNorm, so the LLM never learns to look."""
    return F.relu(_rms(h) - h_max).pow(2).mean() + F.relu(_rms(f) - f_max).pow(2).mean()


def aux_loss(feats, aux, head):
    """Per-patch attribute classification from the projected image features, RMS-normalised
    as the LLM's first RMSNorm sees them (a common offset cannot hide the content)."""
    feats = feats.float()
    logits = head(feats / _rms(feats).unsqueeze(-1))  # (n_img, 196, AUX_DIM)
    total, off = 0.0, 0
    for h, (_, n) in enumerate(AUX_HEADS):
        total = total + F.cross_entropy(logits[..., off:off + n].reshape(-1, n), aux[:, h].reshape(-1))
        off += n
    return total / len(AUX_HEADS)


def optimizer_step(loss, opt, lr_sched, params) -> None:
    """Backward, clip the gradient norm to 1, step the optimizer and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    lr_sched.step()


def make_optimizer(params, lr, wd, device):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8, **kw,
    )


def save_fp16(model, path, ids):
    set_generation_defaults(model, ids)
    model.to(torch.float16).save_pretrained(path, safe_serialization=True)
    model.to(torch.float32)


# ---------------------------------------------------------------------------
# Stage: tokenizer
# ---------------------------------------------------------------------------


def get_processor(args, create=True):
    path = os.path.join(args.out, TARGET_NAME)
    from transformers import AutoProcessor

    if os.path.exists(os.path.join(path, "processor_config.json")) and not args.rebuild_tokenizer:
        proc = AutoProcessor.from_pretrained(path)
        log(f"[tokenizer] loaded processor from {path} (vocab {len(proc.tokenizer)})")
        return proc
    if not create:
        raise FileNotFoundError(path)
    t0 = time.time()
    n = 4000 if args.smoke else 40000
    tok = build_tokenizer(n_samples=n, vocab_size=args.vocab_size)
    proc = build_processor(tok)
    os.makedirs(path, exist_ok=True)
    proc.save_pretrained(path)
    log(f"[tokenizer] trained BPE on {n} generated samples in {time.time() - t0:.1f}s: vocab {len(tok)}; saved to {path}")
    return proc


def stage_tokenizer(args):
    args.rebuild_tokenizer = True
    get_processor(args)


# ---------------------------------------------------------------------------
# Stage: target
# ---------------------------------------------------------------------------


@torch.no_grad()
def eval_loss(model, batches, device, text=False):
    model.eval()
    tot: dict[int, list] = {}
    for b in batches:
        with autocast(device):
            if text:
                logits = model(input_ids=b["text_ids"].to(device)).logits
                labels = b["text_labels"].to(device)
            else:
                logits = model(input_ids=b["input_ids"].to(device), pixel_values=pixel_values(b["images"], device)).logits
                labels = b["labels"].to(device)
        lg, lb = logits[:, :-1].float(), labels[:, 1:]
        ce = F.cross_entropy(lg.transpose(1, 2), lb, ignore_index=-100, reduction="none").sum(1)
        cnt = (lb != -100).sum(1)
        for k, c, n in zip(b["kind"].tolist(), ce.tolist(), cnt.tolist()):
            a = tot.setdefault(k, [0.0, 0])
            a[0] += c
            a[1] += n
    model.train()
    per = {QA_KINDS[k]: v[0] / max(1, v[1]) for k, v in tot.items()}
    allc = sum(v[0] for v in tot.values()) / max(1, sum(v[1] for v in tot.values()))
    return allc, per


def fixed_eval_batches(enc, n, bs, pad_id, with_text=False):
    ds = WorldDataset(enc, EVAL_LOSS_SEED_BASE, n)
    col = Collate(pad_id, with_text)
    return [col([ds[j] for j in range(i, min(n, i + bs))]) for i in range(0, n, bs)]


def stage_target(args):
    from tqdm import tqdm
    from transformers import LlavaForConditionalGeneration

    t_start = time.time()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if not args.init_from:
        proc = get_processor(args)
        tok = proc.tokenizer
        ids = token_ids(tok)
    spec = SMOKE if args.smoke else REAL
    prev = None
    if args.init_from:
        # Continue training a saved target (weights only; fresh optimizer, warm-up and cosine schedule).
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(args.init_from)
        tok = proc.tokenizer
        ids = token_ids(tok)
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32).to(device)
        cfg = model.config
        lp = os.path.join(args.init_from, "train_log.json")
        prev = json.load(open(lp)) if os.path.exists(lp) else {"info": {"steps": 0, "runs": []}}
        log(f"[target] continuing from {args.init_from} ({prev['info'].get('steps', 0)} steps so far)")
    else:
        cfg = vlm_config(ids, spec)
        model = LlavaForConditionalGeneration(cfg).to(device)
    model.train()
    nparam = n_params(model)
    log(f"[target] {nparam / 1e6:.2f}M parameters; text {spec['text']}; vision {spec['vision']}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    enc = Encoder(tok.backend_tokenizer.to_str(), ids["image"])
    steps = args.steps_target
    if steps <= 0:  # auto: fill the time budget (planned from the measured throughput)
        if not args.time_budget_min:
            raise SystemExit("--steps-target 0 (auto) needs --time-budget-min")
        steps = 200_000
    bs = args.batch_size
    n_prev_runs = len(prev["info"].get("runs", [1])) if prev else 0
    base = TARGET_SEED_BASE + (args.seed * 10_000_019 + n_prev_runs * 37_000_000) % 400_000_000
    qa_weights = parse_qa_weights(args.qa_weights)
    ds = WorldDataset(enc, base, steps * bs, batch_size=bs, qa_weights=qa_weights)
    loader = make_loader(ds, bs, args.num_workers, Collate(ids["pad"]))
    eval_batches = fixed_eval_batches(enc, args.eval_examples, bs, ids["pad"])

    # Auxiliary per-patch attribute head on the projector output (training only, not saved):
    # dense supervision that makes the visual features linearly readable early on.
    aux_head = torch.nn.Linear(cfg.text_config.hidden_size, AUX_DIM).to(device)
    captured = {}
    def _hook(mod, inp, out):
        captured["h"], captured["feats"] = inp[0], out

    model.model.multi_modal_projector.register_forward_hook(_hook)
    params = [p for p in model.parameters() if p.requires_grad] + list(aux_head.parameters())
    opt = make_optimizer(params, args.lr_target, args.weight_decay, device)
    sched = Schedule(steps, min(args.warmup_steps, max(1, int(args.warmup_frac * steps))))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    fwd = torch.compile(model) if args.compile else model
    budget = Budget(args.time_budget_min, t_start, reserve_s=args.reserve_s)

    logd = {"stage": "target", "train_loss": [], "aux_loss": [], "eval_loss": [], "lr": []}
    ema = None
    loss_acc, aux_acc, n_acc = None, None, 0
    step = 0
    t_loop = time.time()
    t_rate, step_rate = None, 0
    tokens = 0
    pbar = tqdm(total=steps, desc="target", file=sys.stdout, mininterval=2.0)
    stopped = None
    data_wait = 0.0
    t_end = time.time()
    for batch in loader:
        data_wait += time.time() - t_end
        if step >= sched.total:
            break
        if step == 5:
            t_rate, step_rate = time.time(), step  # skip warm-up/compile steps for throughput
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        pv = pixel_values(batch["images"], device)
        captured.clear()
        with autocast(device):
            logits = fwd(input_ids=input_ids, pixel_values=pv).logits
        lm = lm_loss(logits, labels, args.sample_weight)
        loss = lm
        if args.aux_weight > 0 and "aux" in batch and "feats" in captured:
            la = aux_loss(captured["feats"], batch["aux"].to(device, non_blocking=True), aux_head)
            aux_acc = la.detach() if aux_acc is None else aux_acc + la.detach()
            loss = lm + args.aux_weight * la
        if args.scale_weight > 0 and "feats" in captured:
            loss = loss + args.scale_weight * feature_scale_penalty(captured["h"], captured["feats"])
        optimizer_step(loss, opt, lr_sched, params)
        step += 1
        tokens += int(input_ids.numel())
        loss_acc = lm.detach() if loss_acc is None else loss_acc + lm.detach()
        n_acc += 1
        if step % 10 == 0 or step == 1:
            lv = loss_acc.item() / n_acc  # mean over the steps since the last log (one sync per 10 steps)
            av = aux_acc.item() / n_acc if aux_acc is not None else 0.0
            loss_acc, aux_acc, n_acc = None, None, 0
            ema = lv
            logd["train_loss"].append([step, round(lv, 4)])
            logd["aux_loss"].append([step, round(av, 4)])
            logd["lr"].append([step, opt.param_groups[0]["lr"]])
            pbar.set_postfix(loss=f"{ema:.3f}", aux=f"{av:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        pbar.update(1)
        if t_rate is not None and step == step_rate + 25:
            dt = time.time() - t_rate
            sps = 25 / dt
            log(f"\n[target] throughput: {sps:.2f} steps/s, {sps * bs:.0f} samples/s, "
                f"{tokens / (time.time() - t_loop):.0f} tok/s; {steps} steps would take {steps / sps / 60:.1f} min "
                f"(+{(t_loop - t_start):.0f}s setup); waited {data_wait:.1f}s for data so far")
        if t_rate is not None and step >= step_rate + 25 and (step % 50 == 0 or step == step_rate + 25):
            new_total = budget.plan(step, sched.total, t_rate, step_rate, cap=steps)
            if new_total != sched.total:
                log(f"\n[target] time budget: schedule {sched.total} -> {new_total} steps "
                    f"(data wait so far {data_wait:.1f}s of {time.time() - t_loop:.0f}s)")
                sched.total = new_total
                pbar.total = new_total
                stopped = "time budget"
        if step % args.eval_every == 0 or step == sched.total:
            el, per = eval_loss(model, eval_batches, device)
            logd["eval_loss"].append([step, round(el, 4), {k: round(v, 4) for k, v in per.items()}])
            frms = f"  feat_rms h={_rms(captured['h']).mean():.2f} f={_rms(captured['feats']).mean():.2f}" if "h" in captured else ""
            log(f"\n[target] step {step}: train {ema:.4f}  aux {av:.3f}  eval {el:.4f}  "
                + " ".join(f"{k}={v:.3f}" for k, v in sorted(per.items())) + frms)
        if budget.over():
            stopped = "time budget (hard stop)"
            break
        t_end = time.time()
    pbar.close()
    train_time = time.time() - t_loop
    el, per = eval_loss(model, eval_batches, device)
    logd["eval_loss"].append([step, round(el, 4), {k: round(v, 4) for k, v in per.items()}])
    log(f"[target] done: {step} steps in {train_time:.0f}s; final eval loss {el:.4f}")

    quick = None
    if args.quick_eval > 0:
        from mmspec.world_eval import evaluate, markdown_table

        model.eval()
        with autocast(device):
            quick = evaluate(model, proc, n=args.quick_eval, device=device, batch_size=128, progress=False)
        log("[target] quick held-out check (greedy, n=%d, before fp16 export):\n%s" % (args.quick_eval, markdown_table(quick)))
        for f in quick["failures"][:4]:
            log(f"  [{f['kind']}] {f['prompt']}\n    expected: {f['expected']}\n    got:      {f['got']}")

    path = os.path.join(args.out, TARGET_NAME)
    save_fp16(model, path, ids)
    proc.save_pretrained(path)
    total_time = time.time() - t_start
    this_run = {"steps": step, "batch_size": bs, "lr": args.lr_target, "train_seconds": round(train_time, 1),
                "stage_seconds": round(total_time, 1), "hardware": hardware(device), "final_eval_loss": round(el, 4),
                "init_from": args.init_from, "qa_weights": qa_weights, "batches_by_kind": True}
    prev_info = prev["info"] if prev else {}
    runs = list(prev_info.get("runs") or ([] if not prev else [{k: prev_info.get(k) for k in this_run}])) + [this_run]
    step_offset = prev_info.get("steps", 0) if prev else 0
    info = {
        "name": TARGET_NAME,
        "params": nparam,
        "config": {"text": spec["text"], "vision": spec["vision"]},
        "steps": step_offset + step,
        "runs": runs,
        "planned_steps": step_offset + (sched.total if stopped else steps),
        "batch_size": bs,
        "lr": args.lr_target,
        "train_seconds": round(sum(r["train_seconds"] or 0 for r in runs), 1),
        "stage_seconds": round(sum(r["stage_seconds"] or 0 for r in runs), 1),
        "hardware": hardware(device),
        "final_train_loss": round(ema, 4) if ema else None,
        "final_eval_loss": round(el, 4),
        "final_eval_loss_per_kind": {k: round(v, 4) for k, v in per.items()},
        "stopped": stopped,
        "seed": args.seed,
        "tokens_seen": tokens + (prev_info.get("tokens_seen", 0) if prev else 0),
        "data_wait_seconds": round(data_wait, 1),
        "aux_weight": args.aux_weight,
        "scale_weight": args.scale_weight,
        "sample_weight": args.sample_weight,
        "quick_eval": None if quick is None else {k: round(v["accuracy"], 4) for k, v in quick["per_kind"].items()},
        "token_ids": ids,
        "smoke": args.smoke,
    }
    if prev:  # one continuous log across runs (steps are global)
        for key in ("train_loss", "aux_loss", "lr"):
            logd[key] = prev.get(key, []) + [[a + step_offset] + b for a, *b in logd[key]]
        logd["eval_loss"] = prev.get("eval_loss", []) + [[a + step_offset] + b for a, *b in logd["eval_loss"]]
    logd["info"] = info
    with open(os.path.join(path, "train_log.json"), "w") as f:
        json.dump(logd, f, indent=1)
    write_card(path, info, kind="target")
    log(f"[target] saved to {path} ({total_time:.0f}s for the stage)")
    return logd


# ---------------------------------------------------------------------------
# Stage: drafters
# ---------------------------------------------------------------------------


@torch.no_grad()
def generate_pool(target, enc, ids, n, sampled_frac, device, bs, max_new, seed):
    """Answers of the target to n training prompts (greedy, and some sampled at T=1)."""
    from tqdm import tqdm

    target.eval()
    base = POOL_SEED_BASE + (seed * 1_000_003) % 100_000_000
    items = [encode_example(enc, base + i) for i in range(n)]
    n_sampled = int(round(sampled_frac * n))
    out = []
    order = list(range(n))
    for start in tqdm(range(0, n, bs), desc="target answers", file=sys.stdout, mininterval=2.0):
        chunk = [items[i] for i in order[start:start + bs]]
        do_sample = start >= n - n_sampled
        L = max(len(c["prompt"]) for c in chunk)
        input_ids = torch.full((len(chunk), L), ids["pad"], dtype=torch.long)
        attn = torch.zeros((len(chunk), L), dtype=torch.long)
        for j, c in enumerate(chunk):  # left padding
            input_ids[j, L - len(c["prompt"]):] = torch.tensor(c["prompt"])
            attn[j, L - len(c["prompt"]):] = 1
        imgs = [c["image"] for c in chunk if c["with_image"]]
        pv = pixel_values(torch.from_numpy(np.stack(imgs)) if imgs else None, device)
        with autocast(device):
            kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
            gen = target.generate(
                input_ids=input_ids.to(device), attention_mask=attn.to(device), pixel_values=pv,
                max_new_tokens=max_new, eos_token_id=ids["eos"], pad_token_id=ids["pad"], **kw,
            )
        new = gen[:, L:].tolist()
        for c, toks in zip(chunk, new):
            ans = []
            for t in toks:
                ans.append(t)
                if t == ids["eos"]:
                    break
            while ans and ans[-1] == ids["pad"]:
                ans.pop()
            out.append({"seed": c["seed"], "kind": c["kind"], "with_image": c["with_image"], "prompt": c["prompt"],
                        "prompt_text": c["prompt_text"], "answer": ans, "sampled": do_sample})
    return out


def kl_ce(student_sel, teacher_sel, tgt, ce_w):
    ls = F.log_softmax(student_sel.float(), -1)
    lt = F.log_softmax(teacher_sel.float(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    ce = F.nll_loss(ls, tgt)
    return kl + ce_w * ce, kl, ce


def stage_drafters(args):
    from tqdm import tqdm
    from transformers import AutoProcessor, LlamaForCausalLM, LlavaForConditionalGeneration

    t_start = time.time()
    device = torch.device(args.device)
    torch.manual_seed(args.seed + 1)
    tpath = os.path.join(args.out, TARGET_NAME)
    proc = AutoProcessor.from_pretrained(tpath)
    tok = proc.tokenizer
    ids = token_ids(tok)
    target = LlavaForConditionalGeneration.from_pretrained(tpath, dtype=torch.float32).to(device).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    spec = SMOKE if args.smoke else REAL
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    enc = Encoder(tok.backend_tokenizer.to_str(), ids["image"])

    # (a) the target's own answers
    t0 = time.time()
    pool = generate_pool(target, enc, ids, args.gen_prompts, args.gen_sampled_frac, device, args.gen_batch_size,
                         args.gen_max_new_tokens, args.seed)
    gen_time = time.time() - t0
    n_eos = sum(1 for p in pool if p["answer"] and p["answer"][-1] == ids["eos"])
    log(f"[drafters] generated {len(pool)} target answers in {gen_time:.0f}s "
        f"({sum(len(p['answer']) for p in pool)} tokens, {n_eos} ended with eos)")

    # (b) students
    draft_vlm = LlavaForConditionalGeneration(vlm_config(ids, spec, spec["draft_layers"])).to(device)
    tm, dm = target.model, draft_vlm.model
    dm.vision_tower.load_state_dict(tm.vision_tower.state_dict())
    dm.multi_modal_projector.load_state_dict(tm.multi_modal_projector.state_dict())
    dm.language_model.embed_tokens.load_state_dict(tm.language_model.embed_tokens.state_dict())
    dm.language_model.norm.load_state_dict(tm.language_model.norm.state_dict())
    for p in dm.vision_tower.parameters():
        p.requires_grad_(False)  # frozen copy of the target's vision tower
    text_lm = LlamaForCausalLM(text_config(ids, spec, spec["draft_layers"])).to(device)
    text_lm.model.embed_tokens.load_state_dict(tm.language_model.embed_tokens.state_dict())
    text_lm.model.norm.load_state_dict(tm.language_model.norm.state_dict())
    draft_vlm.train()
    text_lm.train()
    dm.vision_tower.eval()
    log(f"[drafters] draft VLM {n_params(draft_vlm) / 1e6:.2f}M params, text LM {n_params(text_lm) / 1e6:.2f}M params")

    steps = args.steps_draft
    if steps <= 0:
        if not args.time_budget_min:
            raise SystemExit("--steps-draft 0 (auto) needs --time-budget-min")
        steps = 200_000
    bs = args.batch_size
    col = Collate(ids["pad"], with_text=True)
    pool_loader = make_loader(PoolDataset(pool), bs, args.num_workers // 2 or 0, col, shuffle=True, seed=args.seed)
    fresh_base = DISTILL_SEED_BASE + (args.seed * 1_000_033) % 100_000_000
    fresh_loader = make_loader(WorldDataset(enc, fresh_base, steps * bs), bs, args.num_workers - args.num_workers // 2, col)
    eval_batches = fixed_eval_batches(enc, args.eval_examples, bs, ids["pad"], with_text=True)

    def pool_iter():
        while True:
            for b in pool_loader:
                yield b

    pool_it, fresh_it = pool_iter(), iter(fresh_loader)
    params = [p for p in list(draft_vlm.parameters()) + list(text_lm.parameters()) if p.requires_grad]
    opt = make_optimizer(params, args.lr_draft, args.weight_decay, device)
    sched = Schedule(steps, min(args.warmup_steps, max(1, int(args.warmup_frac * steps))))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, sched)
    budget = Budget(args.time_budget_min, t_start, reserve_s=args.reserve_s)
    logd = {"stage": "drafters", "vlm": [], "text": [], "eval": [], "generation_seconds": round(gen_time, 1)}
    ema = {}
    acc_d, n_acc = None, 0
    step = 0
    t_loop = time.time()
    t_rate = None
    stopped = None
    pbar = tqdm(total=steps, desc="drafters", file=sys.stdout, mininterval=2.0)
    while step < sched.total:
        # alternate: the target's own answers / fresh ground-truth examples (both with the target's KL)
        batch = next(pool_it) if (step % 2 == 0 or args.pool_only) else next(fresh_it)
        if step == 5:
            t_rate = time.time()
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        text_ids = batch["text_ids"].to(device, non_blocking=True)
        text_labels = batch["text_labels"].to(device, non_blocking=True)
        pv = pixel_values(batch["images"], device)
        with autocast(device):
            with torch.no_grad():
                t_logits = target(input_ids=input_ids, pixel_values=pv).logits
            d_logits = draft_vlm(input_ids=input_ids, pixel_values=pv).logits
            x_logits = text_lm(input_ids=text_ids).logits
        t_sel, tgt, _ = shifted(t_logits, labels)
        d_sel, _, _ = shifted(d_logits, labels)
        x_sel, tgt_x, _ = shifted(x_logits, text_labels)
        assert torch.equal(tgt, tgt_x)
        loss_v, kl_v, ce_v = kl_ce(d_sel, t_sel, tgt, args.ce_weight)
        loss_x, kl_x, ce_x = kl_ce(x_sel, t_sel, tgt, args.ce_weight)
        loss = loss_v + loss_x
        optimizer_step(loss, opt, lr_sched, params)
        step += 1
        cur = torch.stack([kl_v.detach(), kl_x.detach(), ce_v.detach(), ce_x.detach()])
        acc_d = cur if acc_d is None else acc_d + cur
        n_acc += 1
        if step % 10 == 0 or step == 1:
            v4 = (acc_d / n_acc).tolist()
            acc_d, n_acc = None, 0
            vals = dict(zip(("kl_vlm", "kl_text", "ce_vlm", "ce_text"), v4))
            ema.update(vals)
            logd["vlm"].append([step, round(vals["kl_vlm"], 4), round(vals["ce_vlm"], 4)])
            logd["text"].append([step, round(vals["kl_text"], 4), round(vals["ce_text"], 4)])
            pbar.set_postfix(kl_vlm=f"{ema['kl_vlm']:.3f}", kl_text=f"{ema['kl_text']:.3f}")
        pbar.update(1)
        if t_rate is not None and step == 30:
            sps = 25 / (time.time() - t_rate)
            log(f"\n[drafters] throughput: {sps:.2f} steps/s; {steps} steps would take {steps / sps / 60:.1f} min "
                f"(+{t_loop - t_start:.0f}s setup incl. generation)")
        if t_rate is not None and step >= 30 and (step % 50 == 0 or step == 30):
            new_total = budget.plan(step, sched.total, t_rate, 5, cap=steps)
            if new_total != sched.total:
                log(f"\n[drafters] time budget: schedule {sched.total} -> {new_total} steps")
                sched.total = new_total
                pbar.total = new_total
                stopped = "time budget"
        if step % args.eval_every == 0 or step == sched.total:
            ev = distill_eval(target, draft_vlm, text_lm, eval_batches, device)
            logd["eval"].append([step, ev])
            log(f"\n[drafters] step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
        if budget.over():
            stopped = "time budget (hard stop)"
            break
    pbar.close()
    train_time = time.time() - t_loop
    ev = distill_eval(target, draft_vlm, text_lm, eval_batches, device)
    logd["eval"].append([step, ev])
    log(f"[drafters] done: {step} steps in {train_time:.0f}s: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))

    common = {
        "steps": step,
        "planned_steps": steps,
        "batch_size": bs,
        "lr": args.lr_draft,
        "ce_weight": args.ce_weight,
        "gen_prompts": len(pool),
        "gen_sampled_frac": args.gen_sampled_frac,
        "generation_seconds": round(gen_time, 1),
        "train_seconds": round(train_time, 1),
        "hardware": hardware(device),
        "stopped": stopped,
        "seed": args.seed,
        "token_ids": ids,
        "smoke": args.smoke,
        "final_eval": ev,
    }
    vpath = os.path.join(args.out, DRAFT_VLM_NAME)
    save_fp16(draft_vlm, vpath, ids)
    proc.save_pretrained(vpath)
    xpath = os.path.join(args.out, DRAFT_TEXT_NAME)
    save_fp16(text_lm, xpath, ids)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(xpath)
    stage_s = round(time.time() - t_start, 1)
    for path, name, model, key in ((vpath, DRAFT_VLM_NAME, draft_vlm, "vlm"), (xpath, DRAFT_TEXT_NAME, text_lm, "text")):
        info = dict(common, name=name, params=n_params(model), stage_seconds=stage_s,
                    config={"text": dict(spec["text"], num_hidden_layers=spec["draft_layers"])}
                    | ({"vision": spec["vision"]} if key == "vlm" else {}),
                    final_kl=ev[f"kl_{key}"], final_ce=ev[f"ce_{key}"], final_top1_agreement=ev[f"agree_{key}"])
        d = {"stage": "drafters", "model": name, "loss": logd[key], "eval": logd["eval"], "info": info}
        with open(os.path.join(path, "train_log.json"), "w") as f:
            json.dump(d, f, indent=1)
        write_card(path, info, kind=key)
    log(f"[drafters] saved {vpath} and {xpath} ({stage_s:.0f}s for the stage)")
    return logd


@torch.no_grad()
def distill_eval(target, draft_vlm, text_lm, batches, device):
    draft_vlm.eval()
    text_lm.eval()
    acc = {"kl_vlm": 0.0, "kl_text": 0.0, "ce_vlm": 0.0, "ce_text": 0.0, "agree_vlm": 0.0, "agree_text": 0.0}
    n = 0
    for b in batches:
        input_ids, labels = b["input_ids"].to(device), b["labels"].to(device)
        pv = pixel_values(b["images"], device)
        with autocast(device):
            t = target(input_ids=input_ids, pixel_values=pv).logits
            d = draft_vlm(input_ids=input_ids, pixel_values=pv).logits
            x = text_lm(input_ids=b["text_ids"].to(device)).logits
        t_sel, tgt, _ = shifted(t, labels)
        d_sel, _, _ = shifted(d, labels)
        x_sel, _, _ = shifted(x, b["text_labels"].to(device))
        k = tgt.numel()
        for key, s in (("vlm", d_sel), ("text", x_sel)):
            _, kl, ce = kl_ce(s, t_sel, tgt, 0.0)
            acc[f"kl_{key}"] += kl.item() * k
            acc[f"ce_{key}"] += ce.item() * k
            acc[f"agree_{key}"] += (s.argmax(-1) == t_sel.argmax(-1)).float().sum().item()
        n += k
    draft_vlm.train()
    text_lm.train()
    draft_vlm.model.vision_tower.eval()
    return {k: round(v / max(1, n), 4) for k, v in acc.items()}


# ---------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------

DATA_RECIPE = """Synthetic scenes from `mmspec/world.py`: 224x224 images with 1-8 objects
(8 shapes x 10 colours x 3 sizes) on a 3x3 grid (at most one per cell, with jitter),
on plain / gradient / striped / speckled light or dark backgrounds; ~30% of the objects
(large circles, squares, hexagons, diamonds, hearts and medium circles, squares, hexagons)
carry a digit or a short word ('ok', 'up', 'go', 'hi', 'no') in 24-30 px type.  Each example is a freshly generated
(image, prompt, answer) triple (seed -> example), with prompt kinds weighted
{weights}: detailed descriptions, counting, colour / shape / position of an object
referred to by other attributes, existence, relations, reading text, and text-only
questions (asked with and without the image).  Answers are natural English chosen
among several phrasings; only answer tokens (+ `</s>`) are supervised.
Tokenizer: byte-level BPE trained on 40k generated chat-formatted samples."""


def write_card(path, info, kind):
    weights = ", ".join(f"{k} {v:.2f}" for k, v in QA_WEIGHTS.items())
    recipe = DATA_RECIPE.format(weights=weights)
    ids = info["token_ids"]
    lines = []
    if kind == "target":
        lines += [
            f"# {info['name']}",
            "",
            "Target vision-language model of mmspec (LLaVA architecture: SigLIP vision tower -> "
            "GELU MLP projector -> Llama decoder), trained from scratch on the synthetic shapes world.",
            "",
            "## Architecture",
            "",
            f"- `LlavaForConditionalGeneration`, {info['params'] / 1e6:.2f}M parameters (tied embeddings), stored in float16.",
            f"- Vision: SigLIP, 224x224, patch 16 -> 196 visual tokens, {info['config']['vision']}, "
            "`vision_feature_layer=-1`, `vision_feature_select_strategy='full'`.",
            f"- Text: Llama, {info['config']['text']}, max positions 1024, vocab {ids['vocab']}.",
            "",
            "## Data",
            "",
            recipe,
            "",
            "## Training",
            "",
            f"- {info['steps']} steps (planned {info['planned_steps']}) x batch {info['batch_size']}, AdamW "
            f"(lr {info['lr']}, betas 0.9/0.98, wd 0.05, warm-up then cosine to 10%), grad clip 1.0, "
            f"bf16 autocast on GPU; {info['tokens_seen'] / 1e6:.1f}M tokens (incl. image and padding tokens).",
            f"- Loss: answer-token cross-entropy, mixing the per-token mean and the per-example mean "
            f"(weight {info['sample_weight']} on the latter, so short answers count as much as long descriptions), "
            f"plus {info['aux_weight']} x an auxiliary per-patch loss during training only: a linear head on the "
            "projected image features classifies, for every patch, the colour / shape / size / text of the object in "
            "the patch's grid cell (or empty) and the cell index, from RMS-normalised features; and "
            f"{info['scale_weight']} x a penalty on image-feature RMS above 4 (vision output) / 1 (projector output), "
            "which keeps the per-patch differences visible to the LLM. Both are training-only; the saved model is a plain LLaVA.",
            f"- Training loop {info['train_seconds']:.0f} s, whole stage {info['stage_seconds']:.0f} s, on {info['hardware']} (measured).",
            f"- Final train loss (mean of the last 10 steps) {info['final_train_loss']}, held-out eval loss {info['final_eval_loss']}; "
            f"per kind: {info['final_eval_loss_per_kind']}.",
        ]
        if info.get("stopped"):
            lines.append(f"- Step count set by: {info['stopped']} (`--time-budget-min`).")
        if len(info.get("runs", [])) > 1:
            lines.append(f"- Trained in {len(info['runs'])} consecutive runs (`--init-from`; fresh optimizer and "
                         f"cosine schedule each): " + "; ".join(
                             f"{r['steps']} steps x {r['batch_size']}, lr {r['lr']}, {r['train_seconds']} s"
                             + (" (description and question batches apart; kind weights "
                                + ", ".join(f"{k} {v:.2f}" for k, v in r["qa_weights"].items()) + ")"
                                if r.get("qa_weights") else "") for r in info["runs"]) + ".")
        if info.get("quick_eval"):
            lines.append(f"- Quick greedy check at the end of training (few held-out images): {info['quick_eval']}.")
    else:
        what = ("Draft VLM: same LLaVA architecture as the target with a "
                f"{info['config']['text']['num_hidden_layers']}-layer text decoder; its vision tower and projector "
                "were copied from the trained target (vision tower frozen, projector fine-tuned), embeddings and final "
                "norm initialised from the target.") if kind == "vlm" else (
                f"Text-only draft LM: `LlamaForCausalLM` with {info['config']['text']['num_hidden_layers']} layers; "
                "it never sees the image. Its input is the same chat-formatted prompt built from messages *without* "
                "the image part (`<s>USER: {prompt}\\nASSISTANT:`). Embeddings and final norm initialised from the target.")
        lines += [
            f"# {info['name']}",
            "",
            what,
            "",
            "## Architecture",
            "",
            f"- {info['params'] / 1e6:.2f}M parameters, float16; text {info['config']['text']}"
            + (f"; vision {info['config']['vision']}" if kind == "vlm" else "") + f"; vocab {ids['vocab']} (shared with the target).",
            "",
            "## Distillation",
            "",
            f"- Teacher: `{TARGET_NAME}`. {info['gen_prompts']} training prompts were answered by the target with batched "
            f"`generate` ({100 * (1 - info['gen_sampled_frac']):.0f}% greedy, {100 * info['gen_sampled_frac']:.0f}% sampled at "
            f"temperature 1) in {info['generation_seconds']:.0f} s.",
            "- Batches alternate between those target answers and fresh ground-truth examples from the world generator.",
            f"- Loss on answer positions (teacher-forced through the target): KL(target || drafter) + {info['ce_weight']} x CE "
            "on the answer tokens. Both drafters are trained in the same loop on the same batches.",
            f"- {info['steps']} steps (planned {info['planned_steps']}) x batch {info['batch_size']}, AdamW lr {info['lr']}, "
            f"warm-up then cosine; {info['train_seconds']:.0f} s of training, whole stage {info['stage_seconds']:.0f} s, "
            f"on {info['hardware']} (measured).",
            f"- Final held-out KL {info['final_kl']}, CE {info['final_ce']}, top-1 agreement with the target "
            f"{100 * info['final_top1_agreement']:.1f}% (teacher-forced on ground-truth answers).",
            "",
            "## Data",
            "",
            recipe,
        ]
    lines += [
        "",
        "## Prompt format",
        "",
        "`<s>USER: <image>\\n{prompt}\\nASSISTANT:` (without `<image>\\n` for text-only prompts); the answer follows "
        "after a space and ends with `</s>`. The chat template is saved with the tokenizer/processor.",
        f"Special token ids: {{<unk>: {ids['unk']}, <pad>: {ids['pad']}, <s>: {ids['bos']}, </s>: {ids['eos']}, "
        f"<image>: {ids['image']}}}.",
        "",
        "## Measured quality",
        "",
        "<!-- measured-quality:start -->",
        "Not measured yet: run `python -m mmspec.world_eval --target <this dir> --update-card`"
        if kind == "target" else "See the benchmark results of mmspec (acceptance rates against the target).",
        "<!-- measured-quality:end -->",
        "",
    ]
    if info.get("smoke"):
        lines.insert(1, "\n**SMOKE RUN: tiny model, not for use.**\n")
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmspec.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["all", "tokenizer", "target", "drafters"])
    ap.add_argument("--out", default="assets/models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda if available else cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny models and settings (CPU, < 60 s)")
    ap.add_argument("--steps-target", type=int, default=None, help="0 = fill --time-budget-min")
    ap.add_argument("--steps-draft", type=int, default=None, help="0 = fill --time-budget-min")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr-target", type=float, default=None)
    ap.add_argument("--lr-draft", type=float, default=None)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-frac", type=float, default=0.04)
    ap.add_argument("--warmup-steps", type=int, default=200, help="at most this many warm-up steps")
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--eval-examples", type=int, default=None)
    ap.add_argument("--quick-eval", type=int, default=None, help="held-out images for a greedy check after the target (0: off)")
    ap.add_argument("--time-budget-min", type=float, default=None,
                    help="wall-time budget per stage in minutes (target; drafters): the schedule shrinks to fit")
    ap.add_argument("--reserve-s", type=float, default=None, help="seconds kept from the budget for eval + saving")
    ap.add_argument("--gen-prompts", type=int, default=None, help="prompts answered by the target for distillation")
    ap.add_argument("--gen-sampled-frac", type=float, default=0.3)
    ap.add_argument("--gen-batch-size", type=int, default=None)
    ap.add_argument("--gen-max-new-tokens", type=int, default=None)
    ap.add_argument("--ce-weight", type=float, default=0.25)
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch attribute loss (target)")
    ap.add_argument("--scale-weight", type=float, default=0.1,
                    help="weight of the penalty keeping image-feature RMS bounded (target)")
    ap.add_argument("--sample-weight", type=float, default=0.5,
                    help="share of the per-example mean in the target's CE (rest: per-token mean)")
    ap.add_argument("--pool-only", action="store_true", help="distil only on target answers (no fresh batches)")
    ap.add_argument("--qa-weights", default=None,
                    help="target: change the prompt-kind mix, e.g. 'describe=0.25,shape=0.15,color=0.05' "
                         "(default: world.QA_WEIGHTS); batches hold descriptions or questions, not both")
    ap.add_argument("--vocab-size", type=int, default=3000)
    ap.add_argument("--rebuild-tokenizer", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the target during training (untested on GPU)")
    ap.add_argument("--init-from", default=None,
                    help="target: continue training this saved target (weights; new warm-up + cosine; logs appended). "
                         "Lets the target train over several <10 min commands.")
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    real = dict(steps_target=3400, steps_draft=2500, batch_size=128, lr_target=1.4e-3, lr_draft=2e-3, num_workers=12,
                eval_every=500, eval_examples=256, quick_eval=64, reserve_s=40, gen_prompts=4096,
                gen_batch_size=512, gen_max_new_tokens=256)
    smoke = dict(steps_target=60, steps_draft=20, batch_size=8, lr_target=3e-3, lr_draft=3e-3, num_workers=0,
                 eval_every=30, eval_examples=16, quick_eval=2, reserve_s=5, gen_prompts=16,
                 gen_batch_size=16, gen_max_new_tokens=24)
    defaults = smoke if args.smoke else real
    if args.init_from and args.lr_target is None:
        args.lr_target = 0.6 * defaults["lr_target"]  # continuation: gentler re-warm-up
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log(f"[mmspec.train] {args.stage} -> {args.out} on {args.device}" + (" (smoke)" if args.smoke else ""))
    res = {}
    if args.stage == "tokenizer":
        stage_tokenizer(args)
    if args.stage in ("all", "target"):
        res["target"] = stage_target(args)
    if args.stage in ("all", "drafters"):
        res["drafters"] = stage_drafters(args)
    return res


if __name__ == "__main__":
    main()
