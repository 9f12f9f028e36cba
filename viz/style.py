"""Palette, page CSS and the shared look of every plotly figure.

Colours are Okabe-Ito (colour-blind safe) and every fate has a non-colour cue as well (underline,
outline, strike-through, dashed border). Text colours come from Gradio theme variables so that
dark mode works; figures have transparent backgrounds and mid-grey text for the same reason.
"""
from __future__ import annotations

import plotly.graph_objects as go

# Okabe-Ito
GREEN = "#009E73"  # accepted draft token
ORANGE = "#E69F00"  # target's correction after a rejection
BLUE = "#0072B2"  # bonus token after a fully accepted draft
RED = "#D55E00"  # rejected draft token (vermillion)
GREY = "#999999"  # pending / unreached
SKY = "#56B4E9"
PURPLE = "#CC79A7"
YELLOW = "#F0E442"

FATE_COLOURS = {"accepted": GREEN, "correction": ORANGE, "bonus": BLUE, "rejected": RED, "target": GREY, "pending": GREY}

FONT_COLOUR = "#8a8f98"  # readable on white and on Gradio's dark background
GRID = "rgba(128,128,128,0.22)"

CSS = f"""
/* gr.HTML copies elem_classes onto its outer block and its inner div: style the inner one only */
.mmspec-tokens:not(.block) {{ white-space: pre-wrap; word-break: break-word; line-height: 1.95; font-size: 15px;
  color: var(--body-text-color); min-height: 4em; padding: 2px 4px; }}
.block.mmspec-tokens {{ border: 1px solid var(--border-color-primary) !important; border-radius: 8px; }}
.mmspec-tokens .tok, .mmspec-legend .tok {{ border-radius: 3px; padding: 1px 0; }}
.tok-accepted {{ background: color-mix(in srgb, {GREEN} 26%, transparent); box-shadow: inset 0 -2px 0 {GREEN}; }}
.tok-correction {{ background: color-mix(in srgb, {ORANGE} 30%, transparent); outline: 1.5px solid {ORANGE};
  outline-offset: -1.5px; }}
.tok-bonus {{ background: color-mix(in srgb, {BLUE} 24%, transparent); text-decoration: underline 2px {BLUE};
  text-underline-offset: 3px; }}
.tok-rejected {{ display: none; color: {RED}; text-decoration: line-through 1.5px {RED};
  background: color-mix(in srgb, {RED} 10%, transparent); font-style: italic; }}
/* Gradio prefixes custom CSS with its container; a class on <body> only wins with !important */
body.mmspec-show-rejected .tok-rejected, .mmspec-show-rejected .tok-rejected,
.mmspec-legend .tok-rejected {{ display: inline !important; }}
.tok-pending {{ border: 1px dashed {GREY}; color: var(--body-text-color-subdued); }}
.tok-byte {{ font-family: var(--font-mono, monospace); font-size: 0.8em; opacity: 0.8; }}
.tok.tok-diverge {{ outline: 2px solid {RED}; outline-offset: 1px; }}
.mmspec-legend {{ display: flex; flex-wrap: wrap; gap: 6px 16px; font-size: 13px; align-items: center;
  color: var(--body-text-color); }}
.mmspec-legend .key {{ white-space: nowrap; }}
.mmspec-legend .desc {{ color: var(--body-text-color-subdued); }}
.mmspec-header {{ display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: baseline; font-size: 14px;
  color: var(--body-text-color); padding: 2px 4px; min-height: 3.7em; align-content: flex-start; }}
.mmspec-header .title {{ font-weight: 600; font-size: 15px; }}
.mmspec-header .stat b {{ font-variant-numeric: tabular-nums; }}
.mmspec-header .sub {{ color: var(--body-text-color-subdued); }}
.mmspec-header .done {{ color: {GREEN}; font-weight: 600; }}
.mmspec-clock {{ font-size: 14px; color: var(--body-text-color); font-variant-numeric: tabular-nums; }}
.mmspec-note {{ font-size: 13px; color: var(--body-text-color-subdued); }}
.mmspec-diff {{ font-size: 14px; color: var(--body-text-color); }}
.mmspec-diff .same {{ color: {GREEN}; font-weight: 600; }}
.mmspec-diff .differ {{ color: {RED}; font-weight: 600; }}
.mmspec-diff .side {{ white-space: pre-wrap; word-break: break-word; padding: 4px 8px; margin: 4px 0;
  border-left: 3px solid var(--border-color-primary); }}
.mmspec-banner {{ border: 1px solid {ORANGE}; border-radius: 6px; padding: 8px 12px;
  background: color-mix(in srgb, {ORANGE} 12%, transparent); color: var(--body-text-color); }}
"""


def style_figure(fig: go.Figure, title: str | None = None, height: int | None = None) -> go.Figure:
    """Transparent background, neutral fonts and grids: readable in light and dark themes."""
    fig.update_layout(
        template="none",
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        font=dict(color=FONT_COLOUR, size=12),
        margin=dict(l=50, r=20, t=50 if title else 20, b=40),
        hoverlabel=dict(font_size=12),
    )
    if title:
        fig.update_layout(title=dict(text=title, x=0.01, xanchor="left", font=dict(size=14)))
    if height:
        fig.update_layout(height=height)
    fig.update_xaxes(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID)
    fig.update_yaxes(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID)
    return fig


def empty_figure(message: str, height: int = 260) -> go.Figure:
    """A blank figure carrying a centred note (used when there is nothing to plot yet)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=13, color=FONT_COLOUR))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return style_figure(fig, height=height)
