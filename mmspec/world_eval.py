"""Accuracy of a saved target VLM on held-out synthetic scenes.

    python -m mmspec.world_eval --target assets/models/mmspec-target [--n 200] [--device cuda]

Loads the model with plain transformers (``AutoProcessor`` +
``AutoModelForImageTextToText``), asks every held-out image one question of
each kind, decodes greedily, and scores:

* count / color / shape / position / exists / relation / read_text: exact
  accuracy; the answer must contain the key fact (number, colour, shape,
  position, yes/no, text) and no conflicting one (see ``world.score_answer``);
* describe: fraction of images whose description mentions every object with
  its correct colour, shape, size, position and text, and no object that is
  not there (see ``world.score_description``).

Prints a markdown table and writes JSON (``--json-out``, default
``<target>/world_eval.json``); ``--update-card`` also fills the "Measured
quality" section of ``<target>/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

from mmspec.world import (
    EVAL_KINDS,
    build_messages,
    held_out_seeds,
    make_qa,
    render,
    sample_scene,
    score_answer,
    score_description,
)

CARD_START = "<!-- measured-quality:start -->"
CARD_END = "<!-- measured-quality:end -->"
REQUIRED = {"count": 0.95, "color": 0.95, "shape": 0.95, "position": 0.95, "describe": 0.90}


def eval_items(n: int, kinds=EVAL_KINDS, offset: int = 0):
    """Held-out (seed, scene, image, qa) items: each of n images asked each kind."""
    items = []
    for seed in held_out_seeds(n, offset):
        scene = sample_scene(random.Random(seed))
        img = None
        for ki, kind in enumerate(kinds):
            qa = make_qa(scene, random.Random(seed * 131 + ki), kind)
            if img is None:
                img = render(scene)
            items.append((seed, scene, img, qa))
    return items


@torch.no_grad()
def generate_answers(model, processor, items, device, batch_size=64, max_new_tokens=None, progress=True):
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    answers = [None] * len(items)
    # Long generations (descriptions) batched separately from short ones.
    order = sorted(range(len(items)), key=lambda i: (items[i][3].kind == "describe", i))
    batches = []
    cur = []
    for i in order:
        if cur and (len(cur) >= batch_size or (items[cur[0]][3].kind == "describe") != (items[i][3].kind == "describe")):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="eval generate", file=sys.stdout)
    eos = tok.eos_token_id
    pad = tok.pad_token_id
    for b in it:
        is_desc = items[b[0]][3].kind == "describe"
        mnt = max_new_tokens or (320 if is_desc else 96)
        texts, images = [], []
        for i in b:
            _, _, img, qa = items[i]
            with_image = qa.needs_image
            texts.append(processor.apply_chat_template(build_messages(qa.prompt, with_image), add_generation_prompt=True))
            if with_image:
                images.append(img)
        inputs = processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=mnt, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        new = out[:, inputs["input_ids"].shape[1]:]
        for j, i in enumerate(b):
            answers[i] = tok.decode(new[j], skip_special_tokens=True).strip()
    tok.padding_side = old_side
    return answers


def score(items, answers) -> dict:
    per_kind: dict[str, dict] = {}
    examples = []
    desc_stats = {"objects": 0, "mentioned": 0, "color": 0, "shape": 0, "size": 0, "text": 0}
    for (seed, scene, _, qa), ans in zip(items, answers):
        if qa.kind == "describe":
            res = score_description(scene, ans)
            ok = res["ok"]
            desc_stats["objects"] += res["n_objects"]
            desc_stats["mentioned"] += res["n_mentioned"]
            for k in ("color", "shape", "size", "text"):
                desc_stats[k] += res["attr_correct"][k]
        else:
            ok = score_answer(qa, scene, ans)
        d = per_kind.setdefault(qa.kind, {"n": 0, "correct": 0})
        d["n"] += 1
        d["correct"] += int(ok)
        if not ok and len(examples) < 40:
            examples.append({"seed": seed, "kind": qa.kind, "prompt": qa.prompt, "expected": qa.answer, "got": ans})
    for d in per_kind.values():
        d["accuracy"] = d["correct"] / max(1, d["n"])
    result = {"per_kind": per_kind, "failures": examples}
    if desc_stats["objects"]:
        n = desc_stats["objects"]
        result["describe_objects"] = {
            "objects": n,
            "mentioned_rate": desc_stats["mentioned"] / n,
            **{f"{k}_correct_rate": desc_stats[k] / n for k in ("color", "shape", "size", "text")},
        }
    scored = [d for k, d in per_kind.items()]
    result["overall_accuracy"] = sum(d["correct"] for d in scored) / max(1, sum(d["n"] for d in scored))
    return result


def evaluate(model, processor, n: int = 200, kinds=EVAL_KINDS, device=None, batch_size: int = 64, progress=True) -> dict:
    device = device or next(model.parameters()).device
    items = eval_items(n, kinds)
    t0 = time.time()
    answers = generate_answers(model, processor, items, device, batch_size=batch_size, progress=progress)
    res = score(items, answers)
    res["n_images"] = n
    res["seconds"] = round(time.time() - t0, 1)
    return res


def markdown_table(res: dict) -> str:
    lines = ["| kind | n | accuracy | required |", "| --- | ---: | ---: | ---: |"]
    for kind in EVAL_KINDS:
        d = res["per_kind"].get(kind)
        if not d:
            continue
        req = REQUIRED.get(kind)
        label = "describe (all objects correct)" if kind == "describe" else kind
        lines.append(f"| {label} | {d['n']} | {100 * d['accuracy']:.1f}% | {'≥ %d%%' % round(100 * req) if req else '-'} |")
    lines.append(f"| **overall** | {sum(d['n'] for d in res['per_kind'].values())} | {100 * res['overall_accuracy']:.1f}% | |")
    if "describe_objects" in res:
        o = res["describe_objects"]
        lines.append("")
        lines.append(
            f"Descriptions, per object ({o['objects']} objects): mentioned {100 * o['mentioned_rate']:.1f}%, "
            f"colour {100 * o['color_correct_rate']:.1f}%, shape {100 * o['shape_correct_rate']:.1f}%, "
            f"size {100 * o['size_correct_rate']:.1f}%, text {100 * o['text_correct_rate']:.1f}%."
        )
    return "\n".join(lines)


def update_card(card_path: str, res: dict, meta: str) -> None:
    body = f"{CARD_START}\n{meta}\n\n{markdown_table(res)}\n{CARD_END}"
    text = open(card_path).read() if os.path.exists(card_path) else "# Model card\n"
    if CARD_START in text and CARD_END in text:
        a = text.index(CARD_START)
        b = text.index(CARD_END) + len(CARD_END)
        text = text[:a] + body + text[b:]
    else:
        text = text.rstrip() + "\n\n## Measured quality\n\n" + body + "\n"
    with open(card_path, "w") as f:
        f.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="directory of a saved target (model + processor)")
    ap.add_argument("--n", type=int, default=200, help="number of held-out images (each asked every kind)")
    ap.add_argument("--kinds", default=",".join(EVAL_KINDS), help="comma-separated QA kinds to evaluate")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json-out", default=None, help="default: <target>/world_eval.json")
    ap.add_argument("--update-card", action="store_true", help="fill the 'Measured quality' section of <target>/README.md")
    ap.add_argument("--show-failures", type=int, default=5)
    args = ap.parse_args(argv)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    processor = AutoProcessor.from_pretrained(args.target)
    model = AutoModelForImageTextToText.from_pretrained(args.target, dtype=dtype).to(device).eval()
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    res = evaluate(model, processor, n=args.n, kinds=kinds, device=device, batch_size=args.batch_size)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    res.update({"target": args.target, "device": hw, "dtype": str(dtype).replace("torch.", ""), "decoding": "greedy"})
    table = markdown_table(res)
    print(table)
    for f in res["failures"][: args.show_failures]:
        print(f"\n[{f['kind']}] seed {f['seed']}: {f['prompt']}\n  expected: {f['expected']}\n  got:      {f['got']}")
    out = args.json_out or os.path.join(args.target, "world_eval.json")
    with open(out, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"\nwrote {out}")
    if args.update_card:
        meta = (
            f"Measured by `python -m mmspec.world_eval --n {args.n}` on {res['n_images']} held-out images "
            f"(seeds from `held_out_seeds`), greedy decoding, {res['dtype']} on {hw}, {res['seconds']} s."
        )
        update_card(os.path.join(args.target, "README.md"), res, meta)
        print("updated", os.path.join(args.target, "README.md"))
    return res


if __name__ == "__main__":
    main()
