"""Saved benchmark figures (bench/results/*.fig.json) for the app's Benchmarks tab.

The benchmarks write their plotly figures next to their JSON; this module only finds and loads them,
and says for each whether it was measured or projected (its own title says which, and the caption
repeats it, so a projection is never shown as a measurement).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


@dataclass
class SavedFigure:
    name: str  # file stem, e.g. speed_h100
    caption: str  # markdown shown above the figure
    figure: go.Figure


def _caption(stem: str, meta: dict) -> str:
    if stem.startswith("scale"):
        return ("**Projection, not a measurement**: speed-ups at 7B sizes computed from component times measured "
                f"on random-weight models (`bench/scale.py`, `{stem}.json`).")
    where = meta.get("hardware") or meta.get("device") or "?"
    return (f"**Measured** by `bench/speed.py` on {where}, {meta.get('dtype', '?')}, {meta.get('n', '?')} prompts, "
            f"up to {meta.get('max_new_tokens', '?')} new tokens (`{stem}.json`, table in `{stem}.md`).")


def saved_figures(folder: Path = RESULTS) -> list[SavedFigure]:
    """Every readable figure in `folder`: measurements (GPU, then CPU) before projections; unreadable
    files are skipped."""
    out = []
    for path in sorted(folder.glob("*.fig.json"), key=lambda p: (p.name.startswith("scale"), "cpu" in p.name, p.name)):
        stem = path.name[: -len(".fig.json")]
        try:
            fig = pio.from_json(path.read_text())
            meta_path = path.with_name(stem + ".json")
            meta = json.loads(meta_path.read_text()).get("meta", {}) if meta_path.exists() else {}
        except (OSError, ValueError):
            continue
        out.append(SavedFigure(stem, _caption(stem, meta), fig))
    return out
