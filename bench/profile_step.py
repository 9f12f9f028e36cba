"""Where a decode step's time goes: Python profile of whole generations (after a warm-up).

Runs vanilla and one speculative setting on a few held-out prompts of the embedded world and
prints (1) mean draft / verify / step ms from the traces, (2) the top functions by own time
under cProfile, so engine overhead (Python outside model forwards) is visible. With --torch-profiler it also prints
torch.profiler's table of CPU-side calls (kernel launches, graph launches, copies, syncs, pinned
allocations) and device time, and with --copies it compares the fast path's asynchronous host-to-device
copies (pinned memory) against plain blocking copies.

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
    ap.add_argument("--torch-profiler", action="store_true")
    ap.add_argument("--copies", action="store_true", help="also time generations with blocking copies")
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
        if args.torch_profiler:
            import torch
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if target.device.type == "cuda" else [])
            with profile(activities=acts) as tp:
                g = generate(target, d, examples[0][0], examples[0][1].prompt, cfg)
            n = max(1, len(g.steps) - 1)
            print(f"\n--- torch.profiler, {name}, one generation of {n} steps (totals; divide by steps)")
            print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
            if target.device.type == "cuda":
                print(tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
            torch.cuda.synchronize() if target.device.type == "cuda" else None
    if args.copies:
        from mmspec import kvcache

        def blocking(host, device):
            return host.to(device)

        for label in ("async pinned copies", "blocking copies"):
            if label == "blocking copies":  # every module that imported the copy helper by name
                for mod in [m for n, m in sys.modules.items() if n.startswith("mmspec") and m is not None]:
                    if getattr(mod, "to_device", None) is kvcache.to_device:
                        mod.to_device = blocking
            for name, d in (("vanilla", None), (args.tree, drafter)):
                gens = [generate(target, d, img, qa.prompt, cfg) for img, qa in examples]
                steps = [s for g in gens for s in g.steps if s.kind != "prefill"]
                print(f"[copies] {label:20s} {name:16s} {statistics.mean(g.stats.tokens_per_s for g in gens):7.1f} tok/s  "
                      f"draft {statistics.mean(s.draft_ms for s in steps):.2f} verify {statistics.mean(s.verify_ms for s in steps):.2f} "
                      f"step {statistics.mean(s.step_ms for s in steps):.2f} ms")


if __name__ == "__main__":
    main()
