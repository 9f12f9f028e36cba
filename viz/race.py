"""Replaying measured timelines on one clock: the race of vanilla + up to 3 drafters on a slowed
clock a room can follow, and its panes as HTML.

The runs are measured apart; each step carries `elapsed_s` (seconds since its run's start). The race
shows, at measured time t, every token of each run whose step had finished by t. The slowest run
lasts between min_s and max_s on the slowed clock (real speed when it already does), and the clock
says both times.
"""
from __future__ import annotations

import bisect
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from mmspec.trace import Generation, StepRecord
from viz.tokens import ends_with_eos, esc, step_fates, token_html, tooltip


# ---------------------------------------------------------------- the race of up to four runs
# vanilla + up to 3 drafters, each measured apart, replayed together on one slowed clock.

MAX_PANES = 4
RACE_FATES = ("accepted", "correction", "bonus", "target", "end", "rejected")


@dataclass(frozen=True)
class RaceToken:
    text: str
    fate: str  # one of RACE_FATES; "end" = the end-of-text token, drawn as a marker and never as content
    step: int
    real_s: float  # measured seconds since the run's start when its step finished
    title: str = ""  # tooltip (numbers of the draft); empty unless a vocab was given


@dataclass
class RacePane:
    label: str
    tokens: list[RaceToken]  # nothing after the end marker
    finish_s: float  # measured wall time of the whole run
    tau: float
    device: str
    dtype: str
    acceptance_by_depth: list[float]  # for the overlay chart; empty for vanilla
    drafted_by_depth: list[int]


@dataclass(frozen=True)
class PaneFrame:
    label: str
    tokens: tuple[RaceToken, ...]  # committed by real_s
    real_s: float  # measured time shown for this pane (stops at its finish)
    finished: bool
    ended: bool  # its end-of-text marker is among `tokens`


@dataclass(frozen=True)
class Frame:
    clock_s: float  # slowed clock: seconds since the replay started
    real_s: float  # measured seconds the replay has reached
    panes: tuple[PaneFrame, ...]


@dataclass
class Race:
    panes: list[RacePane]
    frames: list[Frame]
    stretch: float  # slowed-clock seconds per measured second (> 1: slow motion)
    duration_s: float  # replay length on the slowed clock


def _fate(step, i: int) -> str:
    if step.kind in ("prefill", "vanilla") or len(step.tree) == 0:
        return "target"
    if i < len(step.accepted):
        return "accepted"
    return step.next_kind if step.next_kind in ("bonus", "correction") else "target"


def race_tokens(gen: Generation, eos_ids: set[int] | None = None, vocab: dict[int, str] | None = None,
                rejected: bool = False) -> list[RaceToken]:
    """Committed tokens with their fate, end-of-text as an "end" marker and nothing after it.
    With `vocab`, each token carries its tooltip; with `rejected`, thrown-away drafts come too (fate
    "rejected", which the page hides unless asked)."""
    n_total = sum(len(s.new_tokens) for s in gen.steps)
    last_eos = n_total - 1 if ends_with_eos(gen, eos_ids) else None
    return steps_tokens(gen.steps, eos_ids, last_eos, vocab, rejected)


def steps_tokens(steps: Sequence[StepRecord], eos_ids: set[int] | None, last_eos: int | None = None,
                 vocab: dict[int, str] | None = None, rejected: bool = False) -> list[RaceToken]:
    """Race tokens of steps (a finished run, or a run in progress); `last_eos`: the index of a
    committed token known to be end-of-text though its id is not in `eos_ids`."""
    out: list[RaceToken] = []
    n = 0  # committed tokens so far
    for step in steps:
        titled = step_fates(step, vocab) if vocab is not None else None
        committed = [f for f in titled if f.committed] if titled is not None else None
        if rejected and titled is not None:
            out += [RaceToken(f.text, "rejected", step.index, step.elapsed_s, tooltip(f))
                    for f in titled if not f.committed]
        for i, (tok, text) in enumerate(zip(step.new_tokens, step.new_texts)):
            is_end = (eos_ids is not None and tok in eos_ids) or n == last_eos
            title = tooltip(committed[i]) if committed is not None and i < len(committed) else ""
            out.append(RaceToken(text, "end" if is_end else _fate(step, i), step.index, step.elapsed_s,
                                 "" if is_end else title))
            n += 1
            if is_end:
                return out  # an uploaded trace may carry tokens after EOS: never drawn
    return out


def race_pane(label: str, gen: Generation, eos_ids: set[int] | None = None, vocab: dict[int, str] | None = None,
              rejected: bool = False) -> RacePane:
    spec = gen.mode == "speculative"
    return RacePane(label, race_tokens(gen, eos_ids, vocab, rejected), gen.stats.wall_s, gen.stats.tau if spec else 1.0,
                    str(gen.config.get("device", "?")), str(gen.config.get("dtype", "?")),
                    list(gen.stats.acceptance_by_depth) if spec else [],
                    list(gen.stats.drafted_by_depth) if spec else [])


def stretch_for(slowest_s: float, min_s: float = 8.0, max_s: float = 20.0, speed: float = 1.0) -> float:
    """Slowed-clock seconds per measured second: the slowest run lasts between min_s and max_s (real
    speed when it already does), then the viewer's `speed` (2 = twice as fast) divides that."""
    if slowest_s <= 0:
        return 1.0
    return min(max(slowest_s, min_s), max_s) / slowest_s / max(speed, 1e-6)


def pane_at(pane: RacePane, real_s: float) -> PaneFrame:
    k = bisect.bisect_right([t.real_s for t in pane.tokens], real_s + 1e-12)
    shown = tuple(pane.tokens[:k])
    finished = real_s >= pane.finish_s - 1e-12 and k == len(pane.tokens)
    return PaneFrame(pane.label, shown, min(real_s, pane.finish_s), finished,
                     bool(shown) and shown[-1].fate == "end")


def race(runs: Sequence[tuple[str, Generation]], fps: float = 10.0, min_s: float = 8.0, max_s: float = 20.0,
         speed: float = 1.0, eos_ids: set[int] | None = None, vocab: dict[int, str] | None = None,
         rejected: bool = False) -> Race:
    """Frames of the replay of up to MAX_PANES measured runs (label, generation) on one slowed clock.

    Frame k is at clock k/fps; the last frame is exactly the slowest run's end, so every pane ends full."""
    if not 1 <= len(runs) <= MAX_PANES:
        raise ValueError(f"a race has 1 to {MAX_PANES} runs (vanilla + up to 3 drafters), got {len(runs)}")
    panes = [race_pane(label, gen, eos_ids, vocab, rejected) for label, gen in runs]
    slowest = max(p.finish_s for p in panes)
    stretch = stretch_for(slowest, min_s, max_s, speed)
    duration = slowest * stretch
    n = max(1, math.ceil(duration * fps))
    frames = []
    for k in range(n + 1):
        real = slowest * k / n
        frames.append(Frame(duration * k / n, real, tuple(pane_at(p, real) for p in panes)))
    return Race(panes, frames, stretch, duration)


def acceptance_overlay(r: Race) -> dict[str, tuple[list[float], list[int]]]:
    """Per drafter pane: (acceptance rate by depth, steps that reached each depth); vanilla left out."""
    return {p.label: (p.acceptance_by_depth, p.drafted_by_depth) for p in r.panes if p.acceptance_by_depth}


def clock_text(frame: Frame, stretch: float) -> str:
    """'measured 0.412 s · replay 6.2 s (15.0× slower)': both clocks, plain text."""
    how = "real time" if abs(stretch - 1) < 0.05 else (
        f"{stretch:.1f}× slower" if stretch > 1 else f"{1 / stretch:.1f}× faster")
    return f"measured {frame.real_s:.3f} s · replay {frame.clock_s:.1f} s ({how})"


def pane_html(pf: PaneFrame, stats: str = "", state: str | None = None) -> str:
    """Tokens of one pane frame as fate-classed spans; text escaped once (token_html), the end marker
    a badge of its own. The label and `state` are escaped here; `stats` is HTML made by `stats_html`."""
    spans = []
    for t in pf.tokens:
        if t.fate == "end":
            spans.append('<span class="tok tok-end" title="end of text">■ end</span>')
        else:
            title = f' title="{esc(t.title)}"' if t.title else ""
            spans.append(f'<span class="tok tok-{t.fate}" data-step="{t.step}"{title}>{token_html(t.text)}</span>')
    if state is None:
        state = "finished" if pf.finished else "running"
    n = sum(t.fate not in ("end", "rejected") for t in pf.tokens)
    return (f'<div class="mmspec-race-pane" data-state="{esc(state)}"><div class="mmspec-race-label">'
            f'<span class="name">{html.escape(pf.label)}</span> · {n} tokens · {pf.real_s:.3f} s · '
            f'{html.escape(state)}</div>'
            f'{stats}<div class="mmspec-tokens">{"".join(spans)}</div></div>')


def live_frame(label: str, steps: Sequence[StepRecord], elapsed_s: float, eos_ids: set[int] | None,
               vocab: dict[int, str] | None = None) -> PaneFrame:
    """A run in progress (or stopped) as a pane frame: its steps so far, EOS as the end marker."""
    toks = tuple(steps_tokens(steps, eos_ids, None, vocab, rejected=vocab is not None))
    return PaneFrame(label, toks, elapsed_s, False, bool(toks) and toks[-1].fate == "end")


# Styles for pane_html's own classes (the fate classes come from viz.style.CSS); append to the page CSS.
RACE_CSS = """
.mmspec-race-pane { display: flex; flex-direction: column; gap: 4px; }
.mmspec-race-pane .mmspec-tokens { white-space: pre-wrap; word-break: break-word; line-height: 1.9; min-height: 5em; }
.verdict-faster b { color: #009E73; } .verdict-slower b { color: #D55E00; }
.mmspec-race-label .name { font-weight: 600; color: var(--body-text-color); }
.mmspec-race-label { font-size: 13px; color: var(--body-text-color-subdued); font-variant-numeric: tabular-nums; }
.tok-end { border: 1px solid var(--body-text-color-subdued); border-radius: 3px; padding: 0 4px; font-size: 0.8em;
  color: var(--body-text-color-subdued); margin-left: 4px; }
"""


def plain_text(gen: Generation | None) -> str:
    """The answer as text without its end-of-text token ('' without a run): what the text boxes show."""
    if gen is None:
        return ""
    return "".join(t.text for t in race_tokens(gen) if t.fate != "end")
