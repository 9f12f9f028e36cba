"""Drafter internals, when a drafter exposes them.

- `Generation.drafter_info["entropy_profile"]`: attention entropy per target layer, and
  `["chosen_layers"]`: the layers whose features the drafter reads -> `entropy_figure`.
- `StepRecord.extras["visual_map"] = {"grid": [rows, cols], "status": ["kept"|"merged"|"dropped", ...]}`
  (row-major, one entry per visual token) -> `visual_map_figure`, over the image when we have it.
- anything else in drafter_info (e.g. "compression": {...}) -> `info_markdown`.
"""
from __future__ import annotations

import html
import json
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from mmspec.trace import Generation
from viz.style import FONT_COLOUR, ORANGE, SKY, empty_figure, style_figure

VISUAL_STATUSES = ("kept", "merged", "dropped")
_SHOWN_ELSEWHERE = {"entropy_profile", "chosen_layers"}


def find_visual_map(gen: Generation | None, step_index: int | None = None) -> dict[str, Any] | None:
    """The visual map of the given step, else of the first step that has one."""
    if gen is None:
        return None
    steps = gen.steps
    if step_index is not None and 0 <= step_index < len(steps):
        vm = steps[step_index].extras.get("visual_map") if steps[step_index].extras else None
        if vm:
            return vm
    for s in steps:
        if s.extras and s.extras.get("visual_map"):
            return s.extras["visual_map"]
    return None


def has_internals(gen: Generation | None) -> bool:
    if gen is None:
        return False
    info = gen.drafter_info or {}
    return bool(info.get("entropy_profile")) or find_visual_map(gen) is not None or bool(extra_info(info))


def extra_info(info: dict[str, Any]) -> dict[str, Any]:
    """drafter_info keys beyond the basics (name/kind) that are not drawn as figures."""
    return {k: v for k, v in (info or {}).items() if k not in _SHOWN_ELSEWHERE | {"name", "kind"}}


def entropy_figure(info: dict[str, Any] | None) -> go.Figure:
    """Attention entropy per layer as a line, the drafter's chosen layers starred and marked."""
    profile = (info or {}).get("entropy_profile")
    if not profile:
        return empty_figure("This drafter reports no per-layer attention entropy.")
    chosen = [int(c) for c in (info or {}).get("chosen_layers") or [] if 0 <= int(c) < len(profile)]
    layers = list(range(len(profile)))
    fig = go.Figure(go.Scatter(
        x=layers, y=profile, mode="lines+markers", name="attention entropy", line=dict(color=SKY, width=2),
        marker=dict(size=6), hovertemplate="layer %{x}<br>entropy %{y:.3f}<extra></extra>",
    ))
    if chosen:
        fig.add_trace(go.Scatter(
            x=chosen, y=[profile[c] for c in chosen], mode="markers+text", name="chosen layers",
            marker=dict(symbol="star", size=16, color=ORANGE, line=dict(color=FONT_COLOUR, width=1)),
            text=[f"L{c}" for c in chosen], textposition="top center",
            hovertemplate="chosen layer %{x}<br>entropy %{y:.3f}<extra></extra>",
        ))
        for c in chosen:
            fig.add_vline(x=c, line=dict(color=ORANGE, dash="dot", width=1))
    fig.update_xaxes(title="target layer", tickmode="linear", tick0=0, dtick=max(1, -(-len(profile) // 14)),
                     range=[-0.5, len(profile) - 0.5])
    fig.update_yaxes(title="attention entropy (nats)")
    fig.update_layout(showlegend=False)
    label = ", ".join(map(str, chosen)) if chosen else "none"
    return style_figure(fig, title=f"Attention entropy per layer (★ chosen: {label})", height=320)


def _status_grid(vm: dict[str, Any]) -> tuple[int, int, np.ndarray, list[str]]:
    rows, cols = (int(x) for x in vm["grid"])
    status = [str(s) for s in vm["status"]]
    if len(status) != rows * cols:
        raise ValueError(f"visual_map has {len(status)} statuses for a {rows}x{cols} grid")
    z = np.array([VISUAL_STATUSES.index(s) if s in VISUAL_STATUSES else 0 for s in status], dtype=float)
    return rows, cols, z.reshape(rows, cols), status


def visual_map_counts(vm: dict[str, Any]) -> dict[str, int]:
    counts = dict.fromkeys(VISUAL_STATUSES, 0)
    for s in vm.get("status", []):
        counts[s] = counts.get(s, 0) + 1
    return counts


def visual_map_figure(image: Image.Image | None, vm: dict[str, Any] | None) -> go.Figure:
    """Kept / merged / dropped visual tokens over the image (kept: clear, merged: amber ≈, dropped: dark ×)."""
    if not vm:
        return empty_figure("This drafter keeps every visual token (no visual-token map).")
    try:
        rows, cols, z, status = _status_grid(vm)
    except (KeyError, ValueError, TypeError) as e:
        return empty_figure(f"Unreadable visual_map: {html.escape(str(e))}")
    if image is not None:
        img = image.convert("RGB")
        scale = 480 / max(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        w, h = img.size
    else:
        w, h = cols * 20, rows * 20
    fig = go.Figure()
    if image is not None:
        fig.add_trace(go.Image(z=np.asarray(img), hoverinfo="skip", name="image"))
    else:
        fig.add_trace(go.Image(z=np.full((h, w, 3), 200, dtype=np.uint8), hoverinfo="skip", name="no image"))
    cs = [[0.0, "rgba(0,0,0,0)"], [0.33, "rgba(0,0,0,0)"], [0.33, "rgba(230,159,0,0.55)"],
          [0.66, "rgba(230,159,0,0.55)"], [0.66, "rgba(25,25,25,0.78)"], [1.0, "rgba(25,25,25,0.78)"]]
    marks = {"kept": "", "merged": "≈", "dropped": "×"}
    text = np.array([marks.get(s, "") for s in status]).reshape(rows, cols)
    heat = dict(
        z=z, x0=w / cols / 2, dx=w / cols, y0=h / rows / 2, dy=h / rows, zmin=0, zmax=2, colorscale=cs,
        showscale=False, name="visual tokens", customdata=np.array(status).reshape(rows, cols),
        hovertemplate="row %{y:.0f} col %{x:.0f}<br>%{customdata}<extra></extra>", xgap=1, ygap=1,
    )
    if rows * cols <= 1024:
        heat.update(text=text, texttemplate="%{text}", textfont=dict(color="white", size=10))
    fig.add_trace(go.Heatmap(**heat))
    # legend entries (the heatmap itself has no legend)
    for name, colour, symbol in (("kept", FONT_COLOUR, "square-open"), ("merged ≈", ORANGE, "square"),
                                 ("dropped ×", "#191919", "square")):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker=dict(color=colour, symbol=symbol, size=12, line=dict(color=FONT_COLOUR, width=1))))
    counts = visual_map_counts(vm)
    total = rows * cols
    fig.update_xaxes(visible=False, range=[0, w])
    fig.update_yaxes(visible=False, range=[h, 0], scaleanchor="x")
    fig.update_layout(legend=dict(orientation="h", y=-0.05))
    mode = f"{html.escape(str(vm['mode']))}, " if vm.get("mode") else ""
    title = (f"Visual tokens ({mode}{rows}×{cols}): {counts['kept']} kept · {counts['merged']} merged · "
             f"{counts['dropped']} dropped of {total}")
    return style_figure(fig, title=title, height=int(min(620, 140 + 480 * h / max(w, 1))))


def info_markdown(info: dict[str, Any] | None) -> str:
    """Markdown table of the drafter's static info (figures aside)."""
    info = info or {}
    if not info:
        return "_No drafter info (vanilla run)._"
    lines = ["| key | value |", "|---|---|"]
    for k, v in info.items():
        if k in _SHOWN_ELSEWHERE:
            v = f"{len(v)} layers" if k == "entropy_profile" and isinstance(v, list) else v
        if isinstance(v, (dict, list)):
            v = json.dumps(v)
        v = str(v)
        if len(v) > 200:
            v = v[:199] + "…"
        lines.append(f"| {html.escape(str(k))} | {html.escape(v).replace('|', '&#124;')} |")
    return "\n".join(lines)


def internals_note(gen: Generation | None) -> str:
    if gen is None:
        return "Run something (or load a trace) to see the drafter's internals."
    name = gen.config.get("drafter", "?")
    if gen.mode != "speculative":
        return "Vanilla decoding has no drafter."
    if not (gen.drafter_info or {}).get("entropy_profile") and find_visual_map(gen) is None:
        return (f"The drafter **{html.escape(str(name))}** exposes no internals to draw. Feature-level drafters show "
                "per-layer attention entropy with their chosen layers and a map of kept / merged / dropped visual tokens.")
    return f"Internals of **{html.escape(str(name))}**."

