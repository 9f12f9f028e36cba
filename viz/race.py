"""Replaying two measured timelines (vanilla and speculative) on one wall clock.

The runs are measured one after the other; each step carries `elapsed_s` (seconds since its run's
start). The race shows, at measured time t, every step of each run that had finished by t. The
replay plays the timeline at real speed when it fits in [min_s, max_s] seconds, otherwise faster or
in slow motion, and says so.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from mmspec.trace import Generation


@dataclass
class PaneNumbers:
    steps: int  # steps shown (prefill included)
    tokens: int
    elapsed_s: float
    tokens_per_s: float | None
    tau: float | None  # committed tokens per decode forward so far (speculative only)
    finished: bool


def steps_done(gen: Generation, t: float) -> int:
    return bisect.bisect_right([s.elapsed_s for s in gen.steps], t + 1e-12)


def numbers_at(gen: Generation, t: float) -> PaneNumbers:
    k = steps_done(gen, t)
    shown = gen.steps[:k]
    tokens = sum(len(s.new_tokens) for s in shown)
    finished = k >= len(gen.steps) and t >= gen.stats.wall_s - 1e-9
    elapsed = gen.stats.wall_s if finished else min(t, gen.stats.wall_s)
    decode = [s for s in shown if s.kind != "prefill"]
    tau = sum(len(s.new_tokens) for s in decode) / len(decode) if decode and gen.mode == "speculative" else None
    if finished:
        tps = gen.stats.tokens_per_s
        tau = gen.stats.tau if gen.mode == "speculative" else None
    else:
        tps = tokens / elapsed if elapsed > 0 and tokens else None
    return PaneNumbers(k, tokens, elapsed, tps, tau, finished)


def speedup(van: PaneNumbers | None, spec: PaneNumbers | None) -> float | None:
    if van is None or spec is None or not van.tokens_per_s or not spec.tokens_per_s:
        return None
    return spec.tokens_per_s / van.tokens_per_s


def timeline_s(*gens: Generation | None) -> float:
    return max((g.stats.wall_s for g in gens if g is not None), default=0.0)


def schedule(total_s: float, fps: float = 12.0, min_s: float = 3.0, max_s: float = 20.0) -> tuple[float, list[float]]:
    """(speed, measured times of each frame): replay `total_s` measured seconds in [min_s, max_s] real seconds."""
    if total_s <= 0:
        return 1.0, [0.0]
    duration = min(max(total_s, min_s), max_s)
    speed = total_s / duration
    n = max(1, math.ceil(duration * fps))
    return speed, [total_s * k / n for k in range(n + 1)]


def speed_label(speed: float) -> str:
    if abs(speed - 1.0) < 0.05:
        return "real time"
    if speed > 1:
        return f"{speed:.1f}× faster than real time"
    return f"slow motion ({1 / speed:.1f}× slower than real time)"
