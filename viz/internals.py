"""Internals as figures: the attention entropy per target layer and visual-token compression maps.

- `Generation.drafter_info["entropy_profile"]`: attention entropy per target layer, and
  `["chosen_layers"]`: the layers whose features the drafter reads -> `entropy_figure`.
- `StepRecord.extras["visual_map"] = {"grid": [rows, cols], "status": ["kept"|"merged"|"dropped", ...],
  "groups": [entry of each token], "saliency": [the target's attention per token], "mode": ...}`
  (row-major, one entry per visual token; groups / saliency optional) -> `visual_map_figure`, over the
  image when we have it, with `visual_map_summary` saying in words what was merged into what.
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from mmspec.trace import Generation
from viz.style import FONT_COLOUR, ORANGE, SKY, empty_figure, style_figure

VISUAL_STATUSES = ("kept", "merged", "dropped")


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


def entropy_figure(info: dict[str, Any] | None) -> go.Figure:
    """Attention entropy per layer as a line, the drafter's chosen layers starred and marked."""
    profile = (info or {}).get("entropy_profile")
    if not profile:
        return empty_figure("No per-layer attention entropy for this run (a trace without it, or a target "
                            "whose attention the engine does not recompute).")
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


def visual_map_summary(vm: dict[str, Any]) -> str:
    """What the compression did, in words (plain text): what was merged into what, what was dropped,
    and what the shading means."""
    counts = visual_map_counts(vm)
    n = sum(counts.values())
    groups = vm.get("groups") or []
    mode = str(vm.get("mode") or "")
    shade = " Shading: the target's attention to each token (darker = more)." if vm.get("saliency") else ""
    if mode == "pool" and groups:
        g = len(set(groups))
        return (f"{n} visual tokens averaged into {g} entries of about {n / max(g, 1):.0f} tokens each; the lines "
                "mark which tokens were merged into one entry." + shade)
    if mode == "topk":
        return (f"The {counts['kept']} visual tokens the target attends to most are kept as they are; the other "
                f"{counts['dropped']} (×) are dropped." + shade)
    if mode == "queries":
        return (f"All {n} visual tokens are compressed into the drafter's learned queries (≈): none is kept as it "
                "is, each query reads a weighted mix of all of them." + shade)
    return (f"{counts['kept']} kept, {counts['merged']} merged (≈), {counts['dropped']} dropped (×) of {n} visual "
            "tokens." + shade)


def _group_edges(groups: list[int], rows: int, cols: int, w: float, h: float) -> tuple[list, list]:
    """Line segments between neighbouring cells of different groups (one scatter trace, None-separated)."""
    xs: list = []
    ys: list = []
    cw, ch = w / cols, h / rows
    for r in range(rows):
        for c in range(cols):
            g = groups[r * cols + c]
            if c + 1 < cols and groups[r * cols + c + 1] != g:
                xs += [(c + 1) * cw, (c + 1) * cw, None]
                ys += [r * ch, (r + 1) * ch, None]
            if r + 1 < rows and groups[(r + 1) * cols + c] != g:
                xs += [c * cw, (c + 1) * cw, None]
                ys += [(r + 1) * ch, (r + 1) * ch, None]
    return xs, ys


def _cell_notes(vm: dict[str, Any], status: list[str]) -> list[str]:
    groups = vm.get("groups") or []
    sal = vm.get("saliency") or []
    sizes: dict[int, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    notes = []
    for i, st in enumerate(status):
        note = st
        if i < len(groups) and st == "merged":
            note += f" into entry {groups[i]} ({sizes[groups[i]]} tokens)"
        if i < len(sal):
            note += f"<br>attention {sal[i]:.4f}"
        notes.append(note)
    return notes


def _base_image(image: Image.Image | None, rows: int, cols: int) -> tuple[np.ndarray, int, int]:
    if image is None:
        w, h = cols * 20, rows * 20
        return np.full((h, w, 3), 200, dtype=np.uint8), w, h
    img = image.convert("RGB")
    scale = 480 / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    return np.asarray(img), img.width, img.height


def visual_map_figure(image: Image.Image | None, vm: dict[str, Any] | None) -> go.Figure:
    """Visual tokens over the image: kept clear, merged amber ≈, dropped dark ×; with the target's
    attention per token (saliency) as the shading when the drafter recorded it, lines around the
    tokens merged into one entry, and a hover that says what each token became."""
    if not vm:
        return empty_figure("This drafter keeps every visual token (no visual-token map).")
    try:
        rows, cols, z, status = _status_grid(vm)
    except (KeyError, ValueError, TypeError) as e:
        return empty_figure(f"Unreadable visual_map: {html.escape(str(e))}")
    base, w, h = _base_image(image, rows, cols)
    fig = go.Figure(go.Image(z=base, hoverinfo="skip", name="image" if image is not None else "no image"))
    sal = vm.get("saliency")
    if sal and len(sal) == rows * cols:
        top = max(max(sal), 1e-12)
        z = np.array([max(0.0, x) / top for x in sal], dtype=float).reshape(rows, cols)
        cs = [[0.0, "rgba(0,114,178,0)"], [1.0, "rgba(0,114,178,0.8)"]]
        zmax = 1.0
    else:
        cs = [[0.0, "rgba(0,0,0,0)"], [0.33, "rgba(0,0,0,0)"], [0.33, "rgba(230,159,0,0.55)"],
              [0.66, "rgba(230,159,0,0.55)"], [0.66, "rgba(25,25,25,0.78)"], [1.0, "rgba(25,25,25,0.78)"]]
        zmax = 2
    marks = {"kept": "", "merged": "≈", "dropped": "×"}
    text = np.array([marks.get(s, "") for s in status]).reshape(rows, cols)
    heat = dict(
        z=z, x0=w / cols / 2, dx=w / cols, y0=h / rows / 2, dy=h / rows, zmin=0, zmax=zmax, colorscale=cs,
        showscale=False, name="visual tokens", customdata=np.array(_cell_notes(vm, status)).reshape(rows, cols),
        hovertemplate="row %{y:.0f} col %{x:.0f}<br>%{customdata}<extra></extra>", xgap=1, ygap=1,
    )
    if rows * cols <= 1024:
        heat.update(text=text, texttemplate="%{text}", textfont=dict(color="white", size=10))
    fig.add_trace(go.Heatmap(**heat))
    groups = vm.get("groups") or []
    if vm.get("mode") == "pool" and len(groups) == rows * cols:
        xs, ys = _group_edges(groups, rows, cols, w, h)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="white", width=2), hoverinfo="skip",
                                 name="merged together"))
    for name, colour, symbol in (("kept", FONT_COLOUR, "square-open"), ("merged ≈", ORANGE, "square"),
                                 ("dropped ×", "#191919", "square")):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name,
                                 marker=dict(color=colour, symbol=symbol, size=12, line=dict(color=FONT_COLOUR, width=1))))
    fig.update_xaxes(visible=False, range=[0, w])
    fig.update_yaxes(visible=False, range=[h, 0], scaleanchor="x")
    fig.update_layout(legend=dict(orientation="h", y=-0.05))
    mode = f"{html.escape(str(vm['mode']))}, " if vm.get("mode") else ""
    counts = visual_map_counts(vm)
    title = (f"Visual tokens ({mode}{rows}×{cols}): {counts['kept']} kept · {counts['merged']} merged · "
             f"{counts['dropped']} dropped of {rows * cols}<br><sup>{html.escape(visual_map_summary(vm), quote=False)}</sup>")
    return style_figure(fig, title=title, height=int(min(640, 170 + 480 * h / max(w, 1))))
