"""Where a drafter is rejected: per-depth acceptance, the target's probability of each rejected draft
token (near-ties or real mistakes?) and the most frequent (drafted -> target) pairs, with context.

A step's rejection is the drafter's first choice among the children of the last accepted node, when
the target took another token there. Drafts past an accepted end-of-text token are not rejections
(the answer had ended). Runs on any device; tau does not depend on timing.

    python bench/rejections.py --drafters mmspec-feat-aasd,mmspec-draft-vlm --tree chain:16 --n 64 \
        --out /tmp/rejections.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmspec import DecodeConfig, InputError, generate, load_drafter, load_target  # noqa: E402
from mmspec.defaults import BUILTIN, MODELS, shipped_drafter  # noqa: E402
from mmspec.trace import StepRecord  # noqa: E402
from speed import load_prompts  # noqa: E402


def drafter_path(name: str) -> str:
    """A path, a model-free drafter, or a shipped drafter by speed.py's name or its folder's."""
    if "/" in name or name in BUILTIN:
        return name
    return str(shipped_drafter(name) or MODELS / name)  # not shipped: loading says the path does not exist


def step_outcome(step: StepRecord, eos: int) -> tuple[int, int | None]:
    """(accepted depth, rejected node or None) of one speculative step."""
    path = step.accepted
    if any(step.tree.tokens[i] == eos for i in path):
        return len(path), None  # the answer ended inside the accepted drafts
    last = path[-1] if path else -1
    kids = [i for i, p in enumerate(step.tree.parents) if p == last]
    return len(path), (kids[0] if kids else None)


def tally(steps: list[StepRecord], eos: int, into: dict) -> None:
    """Add one generation's speculative steps to the running counts in `into`."""
    text = ""
    for step in steps:
        if step.kind == "draft":
            depth, rej = step_outcome(step, eos)
            for d in range(1, depth + 1):
                into["drafted"][d] += 1
                into["accepted"][d] += 1
            if rej is not None:
                into["drafted"][depth + 1] += 1
                drafted, wanted = step.node_texts[rej], step.next_text
                into["target_p"].append(step.target_probs[rej])
                into["pairs"][f"{drafted!r} -> {wanted!r}"] += 1
                if len(into["contexts"]) < into["max_contexts"]:
                    ctx = text + "".join(step.node_texts[i] for i in step.accepted)
                    into["contexts"].append(f"...{ctx[-60:]}[{drafted} -> {wanted}]")
        text += "".join(step.new_texts)


def summary(into: dict) -> dict:
    ps = into["target_p"]
    return {
        "rejections": len(ps),
        "acceptance_by_depth": {d: round(into["accepted"][d] / n, 4) for d, n in sorted(into["drafted"].items()) if n},
        "target_p_of_rejected_median": round(statistics.median(ps), 3) if ps else None,
        "target_p_of_rejected_below_0.1": round(sum(p < 0.1 for p in ps) / len(ps), 3) if ps else None,
        "top_pairs": into["pairs"].most_common(12),
        "contexts": into["contexts"],
    }


def new_counts(max_contexts: int) -> dict:
    return {"drafted": Counter(), "accepted": Counter(), "target_p": [], "pairs": Counter(), "contexts": [],
            "max_contexts": max_contexts}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=str(MODELS / "mmspec-target"))
    ap.add_argument("--drafters", default="mmspec-feat-aasd,mmspec-draft-vlm", help="names in assets/models or paths")
    ap.add_argument("--tree", default="chain:16")
    ap.add_argument("--n", type=int, default=64, help="held-out prompts")
    ap.add_argument("--kind", default="describe", help="world question kind, or 'mix'")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--contexts", type=int, default=8, help="rejections shown with their context")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        raise SystemExit(f"rejections: {e}") from None


def run(args: argparse.Namespace) -> dict:
    target = load_target(args.target, args.device, args.dtype)
    eos = target.tokenizer.eos_token_id
    prompts = [(img, prompt) for _, img, prompt in load_prompts(args.n, args.kind)]  # speed.py's prompts
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, tree=args.tree)
    out = {"tree": args.tree, "prompts": args.n, "kind": args.kind, "max_new_tokens": args.max_new_tokens,
           "device": str(target.device), "dtype": str(target.dtype), "drafters": {}}
    for name in args.drafters.split(","):
        drafter = load_drafter(drafter_path(name), target)
        counts, tokens, forwards = new_counts(args.contexts), 0, 0
        for img, prompt in prompts:
            gen = generate(target, drafter, img, prompt, cfg)
            tokens, forwards = tokens + gen.stats.new_tokens, forwards + gen.stats.steps
            tally(gen.steps, eos, counts)
        row = {"tau": round(tokens / max(1, forwards), 3), **summary(counts)}
        out["drafters"][name] = row
        print(f"{name} {args.tree}: tau {row['tau']}, {row['rejections']} rejections, target p of the rejected "
              f"draft: median {row['target_p_of_rejected_median']}, below 0.1 {row['target_p_of_rejected_below_0.1']}",
              flush=True)
        print("  " + ", ".join(f"{p} x{k}" for p, k in row["top_pairs"][:6]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
