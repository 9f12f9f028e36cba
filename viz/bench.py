"""Saved benchmark figures (bench/results/*.fig.json) for the app's Benchmarks tab.

The benchmarks write their plotly figures next to their JSON; this module only finds and loads them,
and says for each whether it was measured or projected (its own title says which, and the caption
repeats it, so a projection is never shown as a measurement).
"""
from __future__ import annotations

import html
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


# ---------------------------------------------------------------- human labels, one figure per question

DRAFTER_LABELS = {
    "draft-vlm": "draft VLM", "draft-text": "text-only draft LM", "ngram": "n-gram", "random": "random",
    "feat-eagle": "feature drafter EAGLE", "feat-eagle3": "feature drafter EAGLE-3",
    "feat-dream": "feature drafter DREAM",
    "feat-dream_topk": "feature drafter DREAM + top-k visual", "feat-vispec": "feature drafter ViSpec",
    "feat-msd": "feature drafter MSD", "feat-aasd": "feature drafter AASD", "feat-flash": "feature drafter FLASH",
    "feat-pool2": "feature drafter, visual tokens pooled 2×2",
    "feat-pool4": "feature drafter, visual tokens pooled 4×4",
    "feat-topk": "feature drafter, top-k visual tokens",
}
HF_LABELS = {"generate": "transformers generate", "generate:static": "transformers generate, static cache",
             "prompt-lookup": "transformers prompt lookup"}


def tree_label(spec: str) -> str:
    """chain:8 -> 'chain of 8'; dynamic:24,5,4 -> 'dynamic tree of 24 (depth 5, top-4)'."""
    kind, _, arg = spec.partition(":")
    if kind == "chain" and arg.isdigit():
        return f"chain of {arg}"
    if kind == "dynamic" and arg.count(",") == 2:
        budget, depth, topk = arg.split(",")
        return f"dynamic tree of {budget} (depth {depth}, top-{topk})"
    if kind == "static":
        return "static tree"
    return spec


def drafter_label(name: str) -> str:
    name = name.rstrip("/").split("/")[-1].removeprefix("mmspec-")  # a path shows only its last part
    return DRAFTER_LABELS.get(name, name)


def method_label(method: str) -> str:
    """bench/speed.py's method ids in words: engine:draft-vlm:chain:8 -> 'draft VLM, chain of 8'."""
    eager = method.endswith(":eager")
    base = method.removesuffix(":eager")
    source, _, rest = base.partition(":")
    if source == "hf":
        if rest.startswith("assisted:"):
            label = f"transformers assisted generation, {drafter_label(rest.removeprefix('assisted:'))}"
        else:
            label = HF_LABELS.get(rest, f"transformers {rest}")
    elif rest == "vanilla":
        label = "vanilla (one token per forward)"
    else:
        drafter, _, tree = rest.partition(":")
        label = f"{drafter_label(drafter)}, {tree_label(tree)}" if tree else drafter_label(drafter)
    return label + (", without CUDA graphs" if eager else "")


def hardware_name(meta: dict) -> str:
    """'an H100', 'an H200', 'the CPU': the device a result file was measured on, in words."""
    hw = str(meta.get("hardware") or meta.get("device") or "?")
    for chip in ("H200", "H100", "A100", "A10G", "L40S", "L4", "T4"):  # longer names first: L40S is not an L4
        if chip in hw:
            return f"an {chip}" if chip[0] in "AHL" else f"a {chip}"
    if str(meta.get("device", "")).startswith("cpu") or hw.upper().startswith("CPU"):
        return "the CPU"
    return hw


def applies_here(meta: dict, session_device: str, session_hardware: str | None = None) -> str:
    """Whether a result file's numbers describe this session: 'measured on an H200 — this session runs
    on the CPU: these speed-ups do not apply here' (plain text; escape where it becomes HTML)."""
    where = hardware_name(meta)
    if session_device.startswith("cpu"):
        here = "the CPU"
    else:
        here = hardware_name({"hardware": session_hardware, "device": session_device}) if session_hardware else "a GPU"
    if where == here:
        return f"measured on {where}, like this session: comparable, though load and prompts differ"
    if here == "a GPU" and where != "the CPU":
        return f"measured on {where} — this session runs on a GPU of another or unknown kind: compare with care"
    return f"measured on {where} — this session runs on {here}: these speed-ups do not apply here"


def _rows(rows: list[dict], temperature: float) -> list[dict]:
    return [r for r in rows if r.get("temperature") == temperature and not r.get("error")
            and r.get("tokens_per_s") is not None]


def _where(meta: dict) -> str:
    return f"{meta.get('hardware', '?')}, {meta.get('dtype', '?')}"


def _hbar(fig: go.Figure, n: int, title: str, x_title: str) -> go.Figure:
    """Horizontal bars: long method names fit on the left; the title has its own band above the plot."""
    fig.update_layout(template="none", paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)",
                      height=120 + 26 * n, margin=dict(l=10, r=60, t=72, b=50), showlegend=False,
                      # under the modebar's strip (top 30 px): the title and the buttons never overlap
                      title=dict(text=html.escape(title), x=0.01, xanchor="left", yref="container", y=1,
                                 yanchor="top", pad=dict(t=34), font=dict(size=14)),
                      font=dict(size=12, color="#8a8f98"))
    fig.update_yaxes(automargin=True, autorange="reversed")
    fig.update_xaxes(title=x_title, gridcolor="rgba(128,128,128,0.22)")
    return fig


def speedup_figure(meta: dict, rows: list[dict], temperature: float = 0.0) -> go.Figure:
    """Speed-up over vanilla per method (median tokens/s ratio; whiskers: the method's p10–p90 over
    prompts against vanilla's median), labelled in words, the hardware in the title."""
    ok = [r for r in _rows(rows, temperature) if r.get("speedup") is not None]
    van = next((r for r in ok if r["method"] == "engine:vanilla"), None)
    base = van["tokens_per_s"] if van else None
    lo = [r["speedup"] - r["tokens_per_s_p10"] / base if base and "tokens_per_s_p10" in r else 0 for r in ok]
    hi = [r["tokens_per_s_p90"] / base - r["speedup"] if base and "tokens_per_s_p90" in r else 0 for r in ok]
    fig = go.Figure(go.Bar(
        y=[html.escape(method_label(r["method"])) for r in ok], x=[r["speedup"] for r in ok], orientation="h",
        error_x=dict(type="data", symmetric=False, array=hi, arrayminus=lo, color="#8a8f98"),
        marker_color=["#009E73" if r["speedup"] >= 1 else "#D55E00" for r in ok],
        text=[f"{r['speedup']:.2f}×" for r in ok], textposition="inside", insidetextanchor="start",
        textfont=dict(color="white"),  # inside the bar's base: never under a whisker
        customdata=[r["method"] for r in ok], hovertemplate="%{y}<br>%{x:.2f}× vanilla<extra></extra>",
    ))
    fig.add_vline(x=1.0, line=dict(color="#8a8f98", dash="dot"))
    return _hbar(fig, len(ok), f"Speed-up over vanilla at T={temperature:g}, measured on {_where(meta)}",
                 "speed-up over vanilla (median tokens/s; whiskers p10–p90 over prompts)")


def tau_figure(meta: dict, rows: list[dict], temperature: float = 0.0) -> go.Figure:
    """τ (tokens per target forward, bonus included) per engine method: the figure that does not depend
    on the hardware's speed; methods without τ (transformers' own loops) are left out."""
    ok = [r for r in _rows(rows, temperature) if r.get("tau") is not None and r["method"].startswith("engine:")]
    fig = go.Figure(go.Bar(
        y=[html.escape(method_label(r["method"])) for r in ok], x=[r["tau"] for r in ok], orientation="h",
        marker_color="#0072B2", text=[f"τ {r['tau']:.2f}" for r in ok],
        textposition="inside", insidetextanchor="start",
        textfont=dict(color="white"),
        customdata=[r["method"] for r in ok], hovertemplate="%{y}<br>τ = %{x:.2f}<extra></extra>",
    ))
    fig.add_vline(x=1.0, line=dict(color="#8a8f98", dash="dot"))
    return _hbar(fig, len(ok), f"Tokens per target forward (τ) at T={temperature:g}, measured on {_where(meta)}",
                 "τ: tokens per target forward, bonus included (vanilla = 1)")


@dataclass
class ResultSet:
    name: str  # file stem, e.g. speed_h100
    meta: dict
    rows: list[dict]


def result_sets(folder: Path = RESULTS) -> list[ResultSet]:
    """bench/speed.py's JSON files (speed_*.json) with their rows, GPU before CPU; unreadable or
    row-less files are skipped."""
    out = []
    for path in sorted(folder.glob("speed_*.json"), key=lambda p: ("cpu" in p.name, p.name)):
        try:
            data = json.loads(path.read_text())
            meta, rows = data.get("meta", {}), data.get("rows", [])
        except (OSError, ValueError, AttributeError):
            continue
        if rows:
            out.append(ResultSet(path.stem, meta, rows))
    return out


def best_result_sets(session_device: str, folder: Path = RESULTS) -> list[ResultSet]:
    """Per hardware, the benchmark file with the most rows (the fullest table of that machine); the
    hardware this session runs on first, since only its numbers apply here."""
    best: dict[str, ResultSet] = {}
    for rs in result_sets(folder):
        hw = hardware_name(rs.meta)
        if hw not in best or len(rs.rows) > len(best[hw].rows):
            best[hw] = rs
    return sorted(best.values(), key=lambda rs: "like this session" not in applies_here(rs.meta, session_device))
