"""Acceptance of each drafter on held-out prompts of the synthetic world, split by visual words.

For every committed token we know whether it was an accepted draft or the target's own
(correction/bonus) token. A token "names a visual attribute" when its text, stripped and
lower-cased, is in `mmspec.world.VISUAL_WORDS` (colour, shape, size, position, number words and the
rendered words); sub-word pieces of such words count as non-visual, so the split is approximate.
Reports tau (tokens per target forward, bonus included), the share of visual / other tokens that
were accepted drafts, tokens/s and speed-up over vanilla (measured one after the other, after a
warm-up). Prints a markdown table and writes JSON.

    python bench/embedded_tau.py --n 12 --out bench/results/embedded_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmspec import DecodeConfig, generate, load_drafter, load_target  # noqa: E402
from mmspec.load import ASSETS  # noqa: E402
from mmspec.world import VISUAL_WORDS, held_out_seeds, sample_example  # noqa: E402


def split_acceptance(gen) -> dict[str, list[int]]:
    """[accepted, total] committed tokens, visual vs other (the prefill token excluded)."""
    out = {"visual": [0, 0], "other": [0, 0]}
    for step in gen.steps[1:]:
        n_acc = step.accepted_len
        for i, text in enumerate(step.new_texts):
            key = "visual" if text.strip().lower().strip(".,;:'!?") in VISUAL_WORDS else "other"
            out[key][1] += 1
            out[key][0] += i < n_acc
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default=str(ASSETS / "models" / "mmspec-target"))
    ap.add_argument("--drafters", default=",".join([str(ASSETS / "models" / "mmspec-draft-vlm"),
                                                  str(ASSETS / "models" / "mmspec-draft-text"), "ngram"]))
    ap.add_argument("--trees", default="chain:4;dynamic:16,5,4")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    target = load_target(args.target, args.device, args.dtype)
    examples = [sample_example(s) for s in held_out_seeds(args.n)]
    prompts = [(img if qa.needs_image else None, qa.prompt) for img, qa, _ in examples]
    cfg = dict(max_new_tokens=args.max_new_tokens)
    generate(target, None, prompts[0][0], prompts[0][1], DecodeConfig(max_new_tokens=8))  # warm-up
    vanilla = [generate(target, None, img, p, DecodeConfig(**cfg)) for img, p in prompts]
    van_tps = statistics.median(g.stats.tokens_per_s for g in vanilla)
    rows = [{"drafter": "vanilla", "tree": "-", "tau": 1.0, "visual_accepted": None, "other_accepted": None,
             "tokens_per_s": van_tps, "speedup": 1.0, "lossless": True}]
    for name in args.drafters.split(","):
        drafter = load_drafter(name, target)
        for tree in args.trees.split(";"):
            gens = [generate(target, drafter, img, p, DecodeConfig(tree=tree, **cfg)) for img, p in prompts]
            split = {"visual": [0, 0], "other": [0, 0]}
            for g in gens:
                for k, (a, t) in split_acceptance(g).items():
                    split[k][0] += a
                    split[k][1] += t
            steps = sum(g.stats.steps for g in gens)
            tps = statistics.median(g.stats.tokens_per_s for g in gens)
            rows.append({
                "drafter": Path(name).name, "tree": tree,
                "tau": sum(len(s.new_tokens) for g in gens for s in g.steps[1:]) / max(1, steps),
                "visual_accepted": split["visual"][0] / max(1, split["visual"][1]),
                "other_accepted": split["other"][0] / max(1, split["other"][1]),
                "visual_tokens": split["visual"][1], "other_tokens": split["other"][1],
                "tokens_per_s": tps, "speedup": tps / van_tps,
                "lossless": all(g.token_ids == v.token_ids for g, v in zip(gens, vanilla)),
            })
    head = "| drafter | tree | tau | visual tokens accepted | other tokens accepted | tokens/s | speed-up | = vanilla |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        fmt = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        lines.append(f"| {r['drafter']} | {r['tree']} | {r['tau']:.2f} | {fmt(r['visual_accepted'])} | "
                     f"{fmt(r['other_accepted'])} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['lossless']} |")
    table = "\n".join(lines)
    print(f"{args.n} held-out prompts, greedy, {target.device} {str(target.dtype).replace('torch.', '')}, "
          f"max {args.max_new_tokens} new tokens\n{table}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": str(target.device), "n": args.n, "rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
