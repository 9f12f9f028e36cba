"""The honest measurement protocol shared by the app and the benchmarks.

One method (vanilla, or one drafter with one tree shape) is measured by calling a decode function
once untimed (warm-up: caches, graphs, allocator, lazy imports) and then `repeats` (>= 3) times;
every number is a median with its spread, and carries the device and dtype it was measured on.

Both conventions of tau and the rule that calls a speed-up faster, slower or within noise are the
strings TAU_DOC and VERDICT_DOC below, which the page quotes; they are appended to this docstring.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

from mmspec.trace import Generation

TAU_DOC = (
    "τ (tau, EAGLE convention): tokens committed per target forward after the prefill, the target's own "
    "bonus or correction token included; vanilla decoding has τ = 1.00 and a drafter whose guesses are "
    "never accepted also has τ = 1.00. "
    "Accepted per step (ViSpec / Medusa convention): draft tokens the target accepted per forward, τ − 1. "
    "Neither depends on how busy the machine is, which makes them the figures to trust on a shared CPU."
)
VERDICT_DOC = (
    "A speed-up is called faster only when every timed run of the drafter beat every timed run of vanilla "
    "(their min–max ranges of tokens/s do not overlap), slower when every run was slower, and within noise "
    "otherwise."
)
__doc__ += "\n" + TAU_DOC + "\n\nVerdict rule: " + VERDICT_DOC + "\n"

MIN_REPEATS = 3


@dataclass(frozen=True)
class Spread:
    """Median of repeated measurements with their min–max and p10–p90 ranges."""
    median: float
    lo: float  # min
    hi: float  # max
    p10: float
    p90: float
    n: int

    @classmethod
    def of(cls, xs: list[float]) -> "Spread":
        if not xs:
            raise ValueError("no measurements")
        return cls(statistics.median(xs), min(xs), max(xs), quantile(xs, 0.1), quantile(xs, 0.9), len(xs))

    def overlaps(self, other: "Spread") -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def text(self, fmt: str = ".1f") -> str:
        return f"{self.median:{fmt}} ({self.lo:{fmt}}–{self.hi:{fmt}}, n={self.n})"


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without numpy."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    i = math.floor(pos)
    j = min(i + 1, len(s) - 1)
    return s[i] + (s[j] - s[i]) * (pos - i)


@dataclass
class Measurement:
    """One method measured `repeats` times after a warm-up."""
    method: str
    tokens_per_s: Spread
    wall_s: Spread
    tau: float  # tokens per target forward after the prefill, bonus included (identical across greedy repeats)
    accepted_per_step: float  # tau - 1
    device: str
    dtype: str
    temperature: float
    repeatable: bool | None  # greedy: every repeat gave the same tokens; None when sampling
    runs: list[Generation] = field(default_factory=list)  # the timed runs, in order

    @property
    def where(self) -> str:
        return f"{self.device}, {self.dtype}"

    @property
    def representative(self) -> Generation:
        """The timed run whose tokens/s is the median one (what the race replays)."""
        order = sorted(range(len(self.runs)), key=lambda i: self.runs[i].stats.tokens_per_s)
        return self.runs[order[len(order) // 2]]


def _tau(runs: list[Generation]) -> float:
    """Pooled over the repeats: committed decode tokens / decode forwards (the prefill excluded, as Stats)."""
    steps = sum(g.stats.steps for g in runs)
    committed = sum(sum(len(s.new_tokens) for s in g.steps if s.kind != "prefill") for g in runs)
    return committed / steps if steps else 1.0


def summarise(method: str, runs: list[Generation]) -> Measurement:
    """A Measurement from already-timed runs of one method (no warm-up among them)."""
    if not runs:
        raise ValueError(f"{method}: no timed runs")
    cfg = runs[0].config
    temperature = float(cfg.get("temperature", 0.0) or 0.0)
    repeatable = all(g.token_ids == runs[0].token_ids for g in runs) if temperature == 0 else None
    tau = _tau(runs)
    return Measurement(
        method=method, tokens_per_s=Spread.of([g.stats.tokens_per_s for g in runs]),
        wall_s=Spread.of([g.stats.wall_s for g in runs]), tau=tau, accepted_per_step=tau - 1,
        device=str(cfg.get("device", "?")), dtype=str(cfg.get("dtype", "?")), temperature=temperature,
        repeatable=repeatable, runs=list(runs),
    )


def measure(method: str, decode: Callable[[], Generation], repeats: int = MIN_REPEATS,
            on_run: Callable[[int, Generation], None] | None = None) -> Measurement:
    """Warm-up (untimed, discarded: its timing includes one-off costs) then `repeats` timed calls of
    `decode`; `on_run(i, gen)` after each timed run (i from 1) lets a page say "run 2 of 3"."""
    each = None if on_run is None else (lambda _name, i, gen: on_run(i, gen))
    return measure_all({method: decode}, repeats, each)[method]


def measure_all(decodes: dict[str, Callable[[], Generation]], repeats: int = MIN_REPEATS,
                on_run: Callable[[str, int, Generation], None] | None = None) -> dict[str, Measurement]:
    """Several methods (vanilla first, by convention) measured in rounds: every method's warm-up, then
    round i runs each method once. Why rounds: a shared machine's load drifts over a minute; in rounds
    the drift lands on every method alike instead of on whichever was measured last."""
    if repeats < MIN_REPEATS:
        raise ValueError(f"at least {MIN_REPEATS} timed runs are needed for a spread, got {repeats}")
    for decode in decodes.values():
        decode()
    runs: dict[str, list[Generation]] = {name: [] for name in decodes}
    for i in range(1, repeats + 1):
        for name, decode in decodes.items():
            runs[name].append(decode())
            if on_run is not None:
                on_run(name, i, runs[name][-1])
    return {name: summarise(name, gens) for name, gens in runs.items()}


PROTOCOL_NOTE = (f"Every timing: one untimed warm-up, then at least {MIN_REPEATS} timed runs of each method in "
                 "rounds (vanilla and the drafters taking turns); shown as the median with the slowest and "
                 "fastest run.")


@dataclass(frozen=True)
class Comparison:
    """A method against vanilla measured the same way on the same device."""
    method: str
    speedup: float  # median tokens/s over vanilla's median tokens/s
    speedup_lo: float  # slowest run of the method over the fastest vanilla run
    speedup_hi: float  # fastest run over the slowest vanilla run
    verdict: str  # "faster", "slower" or "within noise"
    device: str
    dtype: str
    same_device: bool

    def text(self) -> str:
        head = f"{self.speedup:.2f}× ({self.speedup_lo:.2f}–{self.speedup_hi:.2f}×): {self.verdict}"
        where = f" · {self.device}, {self.dtype}"
        return head + where + ("" if self.same_device else " · NOT the same device as vanilla")


def verdict(method: Spread, vanilla: Spread) -> str:
    """The rule of VERDICT_DOC: only ranges that do not overlap are a difference."""
    if method.overlaps(vanilla):
        return "within noise"
    return "faster" if method.lo > vanilla.hi else "slower"


def compare(method: Measurement, vanilla: Measurement) -> Comparison:
    m, v = method.tokens_per_s, vanilla.tokens_per_s
    # The ratio's spread pairs extremes, so it covers every pairing of one run of each.
    lo = m.lo / v.hi if v.hi else math.inf
    hi = m.hi / v.lo if v.lo else math.inf
    same = (method.device, method.dtype) == (vanilla.device, vanilla.dtype)
    return Comparison(method.method, m.median / v.median if v.median else math.inf, lo, hi, verdict(m, v),
                      method.device, method.dtype, same)


def table_row(m: Measurement, vs: Comparison | None = None) -> dict[str, str]:
    """One method as display strings (a Dataframe row / gradio_client output); device and dtype on each."""
    row = {
        "method": m.method,
        "tokens/s median (min–max)": m.tokens_per_s.text(),
        "tokens/s p10–p90": f"{m.tokens_per_s.p10:.1f}–{m.tokens_per_s.p90:.1f}",
        "wall s median (min–max)": m.wall_s.text(".3f"),
        "τ (tokens / forward)": f"{m.tau:.2f}",
        "accepted / step (τ − 1)": f"{m.accepted_per_step:.2f}",
        "speed-up": vs.text() if vs is not None else "baseline",
        "device": m.where,
        "same tokens every run": {True: "yes", False: "NO", None: "sampling"}[m.repeatable],
    }
    return row


def compare_all(vanilla: Measurement, others: list[Measurement]) -> list[Comparison]:
    return [compare(m, vanilla) for m in others]


def race_inputs(vanilla: Measurement, others: list[Measurement],
                label: Callable[[str], str] = str) -> list[tuple[str, Generation]]:
    """(label, the median run) of vanilla and each drafter: what `viz.race.race` replays; `label` turns a
    method id into words (e.g. `viz.bench.method_label`)."""
    return [(label(m.method), m.representative) for m in [vanilla, *others]]


def speedup_points(comparisons: list[Comparison]) -> list[dict]:
    """Plain data for `viz.charts.speedup_spread_figure`."""
    return [{"label": c.method, "speedup": c.speedup, "lo": c.speedup_lo, "hi": c.speedup_hi, "verdict": c.verdict,
             "where": f"{c.device}, {c.dtype}"} for c in comparisons]


def as_json(m: Measurement, vs: Comparison | None = None) -> dict:
    """One method as JSON-ready numbers (a gr.JSON output, a bench file): every timing with its median and
    spread, tau in both conventions, the verdict against vanilla, and where it was measured."""
    def spread(s: Spread) -> dict:
        return {"median": s.median, "min": s.lo, "max": s.hi, "p10": s.p10, "p90": s.p90, "n": s.n}

    out = {"method": m.method, "device": m.device, "dtype": m.dtype, "temperature": m.temperature,
           "tokens_per_s": spread(m.tokens_per_s), "wall_s": spread(m.wall_s), "tau": m.tau,
           "accepted_per_step": m.accepted_per_step, "same_tokens_every_run": m.repeatable}
    if vs is not None:
        out["speedup"] = {"median": vs.speedup, "min": vs.speedup_lo, "max": vs.speedup_hi, "verdict": vs.verdict,
                          "same_device_as_vanilla": vs.same_device}
    return out
