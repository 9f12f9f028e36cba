"""Greedy speculative vs vanilla on one device and dtype: where they first differ, and why.

In bf16 a verify pass over many tokens and a one-token vanilla pass use different kernels, so a
near-tie argmax can flip. For each prompt this reports how many tokens match before the first
divergence and the one-token pass's logit margin (top-1 minus the speculative token) there, plus
tokens/s of vanilla, chain and tree. Prints a table and writes JSON.

    python bench/divergence.py --target DIR --drafter DIR --device cuda --dtype bfloat16 --n 20 --out div.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmspec import DecodeConfig, generate, load_drafter, load_target  # noqa: E402
from mmspec.model import CachedModel  # noqa: E402


def prompts(n: int):
    try:
        from mmspec.world import held_out_seeds, sample_example

        for seed in held_out_seeds(n):
            img, qa, _ = sample_example(seed)
            yield img, qa.prompt
    except ImportError:  # no synthetic world: random images
        import numpy as np
        from PIL import Image

        for i in range(n):
            arr = np.random.default_rng(i).integers(0, 255, (224, 224, 3), dtype=np.uint8)
            yield Image.fromarray(arr), ["Describe the image.", "How many objects are there?"][i % 2]


@torch.inference_mode()
def one_token_margin(target, img, prompt, prefix: list[int], spec_token: int) -> float:
    """Logit(top-1) - logit(spec token) at the divergence, as the one-token vanilla pass computes it."""
    cm = CachedModel(target.model, target.family)
    logits = cm.prefill(target.family.prefill_inputs(target.processor, img, prompt))
    for tok in prefix:
        logits = cm.forward(torch.tensor([tok]), torch.tensor([cm.committed]), None)[0]
        cm.commit_rows([0])
    logits = logits.float()
    return float(logits.max() - logits[spec_token])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--drafter", default="ngram")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--trees", default="chain:4,dynamic:24,5,4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    target = load_target(args.target, args.device, args.dtype)
    drafter = load_drafter(args.drafter, target)
    trees = [t for t in args.trees.replace(",dynamic", ";dynamic").replace(",chain", ";chain").replace(",static", ";static").split(";")]
    rows, speed = [], {"vanilla": []} | {t: [] for t in trees}
    for i, (img, prompt) in enumerate(prompts(args.n)):
        van = generate(target, None, img, prompt, DecodeConfig(max_new_tokens=args.max_new_tokens))
        speed["vanilla"].append(van.stats.tokens_per_s)
        for tree in trees:
            spec = generate(target, drafter, img, prompt, DecodeConfig(max_new_tokens=args.max_new_tokens, tree=tree))
            speed[tree].append(spec.stats.tokens_per_s)
            a, b = van.token_ids, spec.token_ids
            match = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
            identical = a == b
            margin = None if identical else one_token_margin(target, img, prompt, a[:match], b[match]) if match < len(b) else None
            rows.append({"prompt": i, "tree": tree, "tokens": len(a), "match_before_divergence": match,
                         "identical": identical, "logit_margin": margin, "tau": spec.stats.tau})
    summary = {
        "device": str(target.device), "dtype": str(target.dtype), "target": args.target, "drafter": args.drafter,
        "gpu": torch.cuda.get_device_name() if target.device.type == "cuda" else None,
        "identical": sum(r["identical"] for r in rows), "runs": len(rows),
        "median_tokens_per_s": {k: statistics.median(v) for k, v in speed.items()},
        "rows": rows,
    }
    print(f"{'tree':18} {'identical':>9} {'mean match':>10} {'margins at divergence':>24}")
    for tree in trees:
        rs = [r for r in rows if r["tree"] == tree]
        margins = [round(r["logit_margin"], 4) for r in rs if r["logit_margin"] is not None]
        print(f"{tree:18} {sum(r['identical'] for r in rs):>4}/{len(rs):<4} "
              f"{statistics.mean(r['match_before_divergence'] for r in rs):>10.1f} {str(margins[:6]):>24}")
    print("median tokens/s:", {k: round(v, 1) for k, v in summary["median_tokens_per_s"].items()})
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
