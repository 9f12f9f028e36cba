"""What the page shows, as plain values by output name (Gradio-free, so views are testable without a
server): the app passes each value to the output of that name, an `Update` as a component update
(value, visibility, a slider's range) and `SKIP` as "leave it". Everything here is built from a
trace bundle (after a run, a cached example run or an uploaded trace) or from a race frame; HTML and
figures come from viz/.
"""
from __future__ import annotations

import functools
import html
import os
from dataclasses import dataclass, field
from typing import Any

from mmspec import InputError
from viz import card, charts, internals, numbers, race, tokens, traceio, tree_fig
from webui.live import MAX_DRAFTERS
from webui.policy import Limits
from webui.request import open_image

PANES = 1 + MAX_DRAFTERS  # vanilla + up to 3 drafters


@dataclass(frozen=True)
class Update:
    """Properties of an output to change (value, visible, minimum / maximum of a slider...); none: leave it."""
    props: dict = field(default_factory=dict)


def update(**props) -> Update:
    return Update(props)


SKIP = Update()


@dataclass(frozen=True)
class Pace:
    """How the race is replayed: frames per second, and the slowest run's length bounds on the slowed clock."""
    fps: float = 10.0
    min_s: float = 8.0
    max_s: float = 20.0


def short_name(name: str) -> str:
    """A path's last part (never a server's directories); a hub id as it is."""
    name = str(name or "?")
    return name.rstrip("/").split("/")[-1] if name.startswith(("/", ".", "~")) else name


def clock_note(text: str, state: str = "idle") -> str:
    """The race clock's line (escaped here); `state` is for the page's tests and styles."""
    return f'<div class="mmspec-clock" data-state="{state}">{html.escape(text)}</div>'


def vocab_of(bundle: traceio.Bundle) -> dict[int, str]:
    """Token texts of every run in the bundle (and the target tokens it saved), for tooltips and trees."""
    return tokens.token_vocab(bundle.vanilla, *bundle.drafted, extra=bundle.token_texts)


def run_labels(bundle: traceio.Bundle) -> list[str]:
    """Pane labels: the measured labels when the bundle has them, else the drafters' names."""
    gens = [bundle.vanilla, *bundle.drafted]
    found = [m.get("label") for m in bundle.measurements]
    if len(found) == len(gens) and all(isinstance(x, str) for x in found):
        return found
    return ["vanilla" if g is bundle.vanilla else short_name(g.config.get("drafter", "?")) for g in gens]


def race_of(bundle: traceio.Bundle, pace: Pace, speed: float = 1.0) -> race.Race:
    """The race of a bundle's runs (vanilla first) at `pace`, tooltips and rejected drafts included."""
    runs = [(label, g) for label, g in zip(run_labels(bundle), [bundle.vanilla, *bundle.drafted]) if g is not None]
    return race.race(runs, pace.fps, pace.min_s, pace.max_s, speed, vocab=vocab_of(bundle), rejected=True)


def panes(frame: race.Frame, stats: list[str] | None = None, state: str | None = None) -> dict[str, Update]:
    """Every pane of a race frame; the panes the race does not use are hidden."""
    out = {}
    for i in range(PANES):
        if i < len(frame.panes):
            extra = stats[i] if stats and i < len(stats) else ""
            out[f"pane{i}"] = update(value=race.pane_html(frame.panes[i], extra, state), visible=True)
        else:
            out[f"pane{i}"] = update(value="", visible=False)
    return out


def pane_stats(bundle: traceio.Bundle, primary_tau: bool) -> list[str]:
    """Each pane's measured numbers (τ first where timings are noisy)."""
    return [numbers.stats_html(m, primary_tau) for m in bundle.measurements]


def inspector(bundle: traceio.Bundle | None, index: int) -> dict[str, Any]:
    """The step inspector at step `index` of the main drafter's run."""
    gen = bundle.main if bundle else None
    if gen is None:
        return dict(tree_plot=None, step_info="_No run yet._", vmap_plot=SKIP)
    vm = internals.find_visual_map(gen, index)
    return dict(tree_plot=tree_fig.tree_figure(gen, index, vocab_of(bundle)), step_info=tree_fig.step_text(gen, index),
                vmap_plot=update(value=internals.visual_map_figure(bundle.image, vm), visible=True) if vm else SKIP)


def internals_tab(bundle: traceio.Bundle) -> dict[str, Any]:
    """The target's attention entropy (any run), the main drafter's card, acceptance for every drafter."""
    spec = bundle.speculative
    info = (spec.drafter_info or {}) if spec else {}
    profile = bundle.target_entropy or info.get("entropy_profile")
    chosen = card.chosen_for(profile, info)[0] if profile else []
    index = tree_fig.pick_step(bundle.main)
    vm = internals.find_visual_map(spec, index) if spec else None
    accept = "".join(f"<h4>{html.escape(label)}</h4>{card.acceptance_html(g)}"
                     for label, g in zip(run_labels(bundle)[1:], bundle.drafted))
    return dict(
        entropy_plot=internals.entropy_figure({"entropy_profile": profile, "chosen_layers": chosen}),
        layer_note=card.layer_choice_html(profile, info if spec else None),
        card_box=card.card_html(info) if spec else card.card_html(None),
        accept_box=accept or card.acceptance_html(None),
        vmap_plot=update(value=internals.visual_map_figure(bundle.image, vm) if vm else None, visible=vm is not None))


def numbers_area(bundle: traceio.Bundle) -> dict[str, Any]:
    """The measured numbers: table, JSON, acceptance overlay and speed-up spreads."""
    ms = bundle.measurements
    overlay = {label: (g.stats.acceptance_by_depth, g.stats.drafted_by_depth)
               for label, g in zip(run_labels(bundle)[1:], bundle.drafted)}
    return dict(numbers=numbers.table_html(ms), measurements=ms, overlay_plot=charts.acceptance_overlay_figure(overlay),
                spread_plot=charts.speedup_spread_figure(numbers.points(ms)))


def fate_counts(gen, vocab: dict[int, str]) -> dict[str, int]:
    """Tokens of each fate in a run as the race draws them: the end of text is a marker, not counted."""
    counts = dict.fromkeys(tokens.FATES, 0)
    for t in race.race_tokens(gen, None, vocab, rejected=True):
        if t.fate in counts:
            counts[t.fate] += 1
    return counts


def everything(bundle: traceio.Bundle, pace: Pace, runs: list[dict], trace_path: str | None) -> dict[str, Any]:
    """Every view rebuilt from a bundle (after a run, or from an uploaded trace); the panes at the race's
    start, which the race then fills."""
    van, spec, gen = bundle.vanilla, bundle.speculative, bundle.main
    index = tree_fig.pick_step(gen)
    start = race_of(bundle, pace).frames[0]
    return {
        **panes(start, state="ready"),
        **numbers_area(bundle),
        **inspector(bundle, index),
        **internals_tab(bundle),  # after the inspector: it says whether this run has a visual map at all
        **dict(
            legend=tokens.legend_html(fate_counts(spec, vocab_of(bundle)) if spec else None),
            clock=clock_note("Every run measured: the race starts.", "ready"),
            step_slider=update(minimum=0, maximum=max(1, len(gen.steps) - 1), value=index, step=1),
            depth_plot=charts.acceptance_by_depth_figure(spec), hist_plot=charts.accepted_length_figure(spec),
            diff_box=tokens.diff_html(van, spec), van_text=race.plain_text(van), spec_text=race.plain_text(spec),
            summary_df=charts.summary_table(runs), summary_plot=charts.summary_figure(runs), trace_file=trace_path),
    }


def session_rows(runs: list[dict], bundle: traceio.Bundle, source: str = "") -> list[dict]:
    """The session table gains one row per drafter of this bundle."""
    runs = list(runs or [])
    ms = bundle.measurements
    for i, g in enumerate(bundle.drafted or [None], 1):
        measured = (ms[0], ms[i]) if len(ms) > i else None
        runs.append(charts.summary_row(len(runs) + 1, bundle.vanilla, g, source, measured))
    return runs


@functools.lru_cache(maxsize=64)
def _image_stats(path: str, mtime: float, limits: Limits) -> dict:
    img, _ = open_image(path, limits)  # the run's own size limits, checked before the pixels are decoded
    return card.image_stats_of(img)


def scope_html(prompt: str, image_path: str | None, limits: Limits) -> str:
    """A warning when the question or picture lies outside the embedded target's world; '' inside."""
    stats = None
    if image_path:
        try:
            stats = _image_stats(image_path, os.path.getmtime(image_path), limits)
        except (InputError, OSError):
            stats = None  # an unreadable picture is the run's to refuse; the question is still checked
    scope = card.world_scope(str(prompt or ""), stats)
    if scope.inside:
        return ""
    return f'<div class="mmspec-banner mmspec-scope">⚠ {html.escape(scope.reason)}</div>'
