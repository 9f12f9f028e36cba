"""Run-level charts: acceptance by draft depth, accepted-length histogram, and the session summary."""
from __future__ import annotations

import html
from collections import Counter
from typing import Any

import plotly.graph_objects as go

from mmspec.trace import Generation
from viz.style import BLUE, FONT_COLOUR, GREEN, SKY, empty_figure, style_figure
from viz.tokens import esc


def acceptance_by_depth_figure(gen: Generation | None) -> go.Figure:
    """P(depth d accepted | depth d-1 accepted and drafted), with how many steps reached each depth."""
    if gen is None or not gen.stats.acceptance_by_depth:
        return empty_figure("No drafts in this run: acceptance by depth needs a speculative run.")
    rates = gen.stats.acceptance_by_depth
    reached = gen.stats.drafted_by_depth
    depths = list(range(1, len(rates) + 1))
    fig = go.Figure(go.Bar(
        x=depths, y=rates, marker_color=GREEN, name="acceptance",
        text=[f"{r:.0%}" for r in rates], textposition="outside",
        customdata=reached,
        hovertemplate="depth %{x}<br>accepted %{y:.1%} of %{customdata} steps that got here<extra></extra>",
    ))
    fig.update_xaxes(title="draft depth", tickmode="linear", dtick=1)
    fig.update_yaxes(title="acceptance rate", range=[0, 1.15], tickformat=".0%")
    return style_figure(fig, title="Acceptance rate by draft depth (whole run)", height=300)


def accepted_lengths(gen: Generation) -> list[int]:
    return [len(s.accepted) for s in gen.steps if s.kind != "prefill"]


def accepted_length_figure(gen: Generation | None) -> go.Figure:
    """How many draft tokens each target forward accepted (0 = the draft was rejected at once)."""
    if gen is None or gen.mode != "speculative" or not gen.steps:
        return empty_figure("Accepted-length histogram needs a speculative run.")
    lengths = accepted_lengths(gen)
    if not lengths:
        return empty_figure("No decode steps after the prefill.")
    counts = Counter(lengths)
    xs = list(range(0, max(lengths) + 1))
    ys = [counts.get(x, 0) for x in xs]
    fig = go.Figure(go.Bar(
        x=xs, y=ys, marker_color=SKY, name="steps", text=ys, textposition="outside",
        hovertemplate="%{y} forwards accepted %{x} draft tokens<extra></extra>",
    ))
    mean = sum(lengths) / len(lengths)
    fig.add_vline(x=mean, line=dict(color=BLUE, dash="dash", width=2))
    fig.add_annotation(x=1, y=1.02, xref="paper", yref="paper", xanchor="right", yanchor="bottom", showarrow=False,
                       text=f"mean {mean:.2f} accepted (dashed) · τ = {gen.stats.tau:.2f}", font=dict(color=FONT_COLOUR))
    fig.update_xaxes(title="accepted draft tokens per target forward", tickmode="linear", dtick=1)
    fig.update_yaxes(title="target forwards", range=[0, max(ys) * 1.3 + 1])
    return style_figure(fig, title="Accepted length per step", height=300)


SUMMARY_HEADERS = ["#", "drafter", "shape", "temp", "tokens", "τ", "vanilla tok/s", "spec tok/s", "speed-up", "verdict",
                   "output"]


def summary_row(n: int, vanilla: Generation | None, spec: Generation | None, source: str = "",
                measured: tuple[dict, dict] | None = None) -> dict[str, Any]:
    """One run of the session as a dict (see SUMMARY_HEADERS for the table columns). With `measured`
    (vanilla's and the drafter's `webui.measure.as_json`), tokens/s and speed-up are the medians of the
    repeated runs and the verdict comes along; without (an old trace), they are of the one run."""
    from viz.tokens import first_divergence

    g = spec or vanilla
    drafter = str(g.config.get("drafter", "?")) if g else "?"
    drafter = drafter.rstrip("/").split("/")[-1] if "/" in drafter else drafter
    van_tps = vanilla.stats.tokens_per_s if vanilla else None
    spec_tps = spec.stats.tokens_per_s if spec else None
    speedup = spec_tps / van_tps if van_tps and spec_tps else None
    verdict = "one run" if speedup is not None else None
    if measured is not None and measured[1].get("speedup"):
        van_tps, spec_tps = measured[0]["tokens_per_s"]["median"], measured[1]["tokens_per_s"]["median"]
        speedup, verdict = measured[1]["speedup"]["median"], measured[1]["speedup"]["verdict"]
    same = "–"
    if vanilla and spec:
        same = "identical" if first_divergence(vanilla.token_ids, spec.token_ids) is None else "differs"
    return {
        "#": n, "drafter": drafter + (f" ({source})" if source else ""),
        "shape": str(g.config.get("tree", "")) if spec else "–",
        "temp": float(g.config.get("temperature", 0.0) or 0.0) if g else 0.0,
        "tokens": (spec or vanilla).stats.new_tokens if g else 0,
        "τ": round(spec.stats.tau, 2) if spec else None,
        "vanilla tok/s": round(van_tps, 1) if van_tps is not None else None,
        "spec tok/s": round(spec_tps, 1) if spec_tps is not None else None,
        "speed-up": round(speedup, 2) if speedup is not None else None,
        "verdict": verdict,
        "output": same,
    }


def summary_table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [[("" if r.get(h) is None else r.get(h)) for h in SUMMARY_HEADERS] for r in rows]


def summary_figure(rows: list[dict[str, Any]]) -> go.Figure:
    """Speed-up of each run in this session, labelled with drafter, shape and τ."""
    rows = [r for r in rows if r.get("speed-up") is not None]
    if not rows:
        return empty_figure("Runs you make in this session are compared here.", height=240)
    labels = [f"#{esc(r['#'])} {esc(r['drafter'])}<br>{esc(r['shape'])}" for r in rows]
    fig = go.Figure(go.Bar(
        x=labels, y=[r["speed-up"] for r in rows], marker_color=[GREEN if r["speed-up"] >= 1 else "#D55E00" for r in rows],
        text=[f"{r['speed-up']:.2f}× · τ {r['τ']:.2f} · {esc(r.get('verdict') or '')}" for r in rows],
        textposition="outside",
        hovertemplate="%{x}<br>speed-up %{y:.2f}×<extra></extra>", width=[0.5] * len(rows) if len(rows) < 5 else None,
    ))
    fig.add_hline(y=1.0, line=dict(color=FONT_COLOUR, dash="dot"))
    top = max(r["speed-up"] for r in rows)
    fig.update_yaxes(title="speed-up over vanilla (tokens/s)", range=[0, max(1.2, top * 1.25)])
    fig.update_xaxes(showgrid=False)
    return style_figure(fig, title="Runs in this session", height=320)


OVERLAY_COLOURS = (GREEN, BLUE, "#D55E00", "#CC79A7")  # Okabe-Ito, one per drafter pane
# Each later line is thinner, with its own marker, so drafters with equal rates stay visible: a thin
# line inside a wide one where they coincide (equal acceptance is common on easy prompts).
OVERLAY_LINES = ((6.0, "circle", 12), (3.5, "diamond", 9), (2.0, "square", 6), (1.0, "x", 5))


def acceptance_overlay_figure(overlay: dict[str, tuple[list[float], list[int]]]) -> go.Figure:
    """Acceptance by draft depth of several drafters on one prompt, one line each (from
    `viz.race.acceptance_overlay`); a depth reached by no step is left out rather than drawn as 0."""
    if not overlay:
        return empty_figure("Acceptance by depth needs at least one speculative run in the race.")
    fig = go.Figure()
    for (label, (rates, reached)), colour, (width, symbol, size) in zip(overlay.items(), OVERLAY_COLOURS,
                                                                        OVERLAY_LINES):
        keep = [d for d in range(len(rates)) if d < len(reached) and reached[d] > 0]
        fig.add_trace(go.Scatter(
            x=[d + 1 for d in keep], y=[rates[d] for d in keep], customdata=[reached[d] for d in keep],
            mode="lines+markers", name=html.escape(label), line=dict(color=colour, width=width),
            marker=dict(symbol=symbol, size=size),
            hovertemplate=f"{html.escape(label)}<br>depth %{{x}}: %{{y:.0%}} of %{{customdata}} steps<extra></extra>",
        ))
    fig.update_xaxes(title="draft depth", tickmode="linear", dtick=1)
    fig.update_yaxes(title="acceptance rate", range=[0, 1.05], tickformat=".0%")
    style_figure(fig, title="Acceptance by draft depth, drafters on this prompt", height=360)
    # The legend has a strip of its own at the bottom: never over the lines, never under the title.
    fig.update_layout(showlegend=True, margin=dict(b=100),
                      legend=dict(orientation="h", x=0, xanchor="left", y=0, yanchor="bottom", yref="container"))
    return fig


VERDICT_COLOURS = {"faster": GREEN, "slower": "#D55E00", "within noise": "#999999"}


def _inward(points: list[dict]) -> list[str]:
    """Each point's label leans towards the middle of the drawn range (vanilla's 1x included), so a
    point near either edge keeps its label inside the plot."""
    lo, hi = min(1.0, *(p["lo"] for p in points)), max(1.0, *(p["hi"] for p in points))
    third = (hi - lo) / 3
    return ["top right" if p["speedup"] < lo + third else "top left" if p["speedup"] > hi - third else "top center"
            for p in points]


def speedup_spread_figure(points: list[dict]) -> go.Figure:
    """Speed-up of each drafter over vanilla as a median with its min–max range (from
    `webui.measure.speedup_points`), coloured by verdict; the device and dtype are in the title."""
    if not points:
        return empty_figure("Speed-ups appear here once vanilla and a drafter are measured.")
    labels = [html.escape(p["label"]) for p in points]
    fig = go.Figure(go.Scatter(
        x=[p["speedup"] for p in points], y=labels, mode="markers+text", name="speed-up",
        error_x=dict(type="data", symmetric=False, array=[p["hi"] - p["speedup"] for p in points],
                     arrayminus=[p["speedup"] - p["lo"] for p in points], color=FONT_COLOUR, thickness=2),
        marker=dict(size=12, color=[VERDICT_COLOURS.get(p["verdict"], FONT_COLOUR) for p in points]),
        text=[f"{p['speedup']:.2f}× {html.escape(p['verdict'])}" for p in points], textposition=_inward(points),
        customdata=[p["verdict"] for p in points], hovertemplate="%{y}: %{x:.2f}× (%{customdata})<extra></extra>",
    ))
    fig.add_vline(x=1.0, line=dict(color=FONT_COLOUR, dash="dot"))
    wheres = sorted({p["where"] for p in points})
    fig.update_xaxes(title="speed-up over vanilla (dot: median; bar: slowest to fastest)", automargin=True)
    # First method on top, with room above each point for its label (a categorical axis counts 0, 1, ...).
    fig.update_yaxes(automargin=True, range=[len(points) - 0.5, -0.8])
    return style_figure(fig, title=html.escape(f"Speed-up over vanilla, {' / '.join(wheres)}"),
                        height=140 + 60 * len(points))
