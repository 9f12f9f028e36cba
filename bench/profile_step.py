"""Where a decode step's time goes: Python profile of whole generations (after a warm-up).

Runs vanilla and one speculative setting on a few held-out prompts of the embedded world and
prints (1) mean draft / verify / step ms from the traces, (2) the top functions by own time
under cProfile, so engine overhead (Python outside model forwards) is visible.

    python bench/profile_step.py --device cuda --drafter assets/models/mmspec-draft-vlm --tree dynamic:24,5,4
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmspec import DecodeConfig, generate, load_drafter, load_target  # noqa: E402
from mmspec.world import held_out_seeds, sample_example  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default=None)
    ap.add_argument("--drafter", default="assets/models/mmspec-draft-vlm")
    ap.add_argument("--tree", default="dynamic:24,5,4")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    target = load_target(args.target, args.device, args.dtype)
    drafter = load_drafter(args.drafter, target)
    examples = [sample_example(s)[:2] for s in held_out_seeds(args.n)]
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, tree=args.tree)
    generate(target, drafter, examples[0][0], examples[0][1].prompt, cfg)  # warm-up
    for name, d in (("vanilla", None), (f"{args.drafter} {args.tree}", drafter)):
        prof = cProfile.Profile()
        gens = []
        prof.enable()
        for img, qa in examples:
            gens.append(generate(target, d, img, qa.prompt, cfg))
        prof.disable()
        steps = [s for g in gens for s in g.steps if s.kind != "prefill"]
        print(f"\n=== {name}: {statistics.mean(g.stats.tokens_per_s for g in gens):.1f} tok/s, "
              f"tau {statistics.mean(g.stats.tau for g in gens):.2f}, "
              f"draft {statistics.mean(s.draft_ms for s in steps):.2f} ms, verify {statistics.mean(s.verify_ms for s in steps):.2f} ms, "
              f"step {statistics.mean(s.step_ms for s in steps):.2f} ms")
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
