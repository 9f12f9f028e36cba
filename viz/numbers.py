"""The measured numbers on the page, from `webui.measure.as_json` dicts (plain data; viz imports
nothing from webui): the table of medians and spreads, the one-line verdicts of the status, and the
notes that define tau and the verdict rule. Every value is escaped here, where it becomes HTML.
"""
from __future__ import annotations

import html

from viz.tokens import esc

TABLE_HEADS = ("method", "τ (tokens / forward)", "accepted / step (τ − 1)", "tokens/s median (min–max)",
               "wall s median", "speed-up (min–max)", "verdict", "device, dtype", "runs")


def _speedup(m: dict) -> tuple[str, str]:
    vs = m.get("speedup")
    if not vs:
        return "baseline", "–"
    return f"{vs['median']:.2f}× ({vs['min']:.2f}–{vs['max']:.2f}×)", vs["verdict"]


def table_html(ms: list[dict]) -> str:
    """One row per measured method (vanilla first), τ before tokens/s: on a busy CPU τ is the figure
    that does not move."""
    if not ms:
        return '<div class="mmspec-note">Numbers appear here once a run is measured.</div>'
    rows = []
    for m in ms:
        tps, wall = m["tokens_per_s"], m["wall_s"]
        speed, verdict = _speedup(m)
        cells = (m.get("label") or m["method"], f"{m['tau']:.2f}", f"{m['accepted_per_step']:.2f}",
                 f"{tps['median']:.1f} ({tps['min']:.1f}–{tps['max']:.1f})", f"{wall['median']:.3f}", speed, verdict,
                 f"{m['device']}, {m['dtype']}", f"{tps['n']} after a warm-up")
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in TABLE_HEADS)
    return f'<table class="mmspec-card-table mmspec-measure"><tr>{head}</tr>{"".join(rows)}</table>'


def stats_html(m: dict | None, primary_tau: bool = True) -> str:
    """One pane's measured numbers (a `webui.measure.as_json` dict): τ first where timings are noisy
    (the CPU), tokens/s as a median with its range, the verdict against vanilla, device and dtype."""
    if not m:
        return ""
    tps = m["tokens_per_s"]
    tau = (f'<span class="stat" title="tokens per target forward, bonus included">τ <b>{m["tau"]:.2f}</b> '
           f'({m["accepted_per_step"]:.2f} accepted / step)</span>')
    speed = (f'<span class="stat">{tps["median"]:.1f} tok/s median ({tps["min"]:.1f}–{tps["max"]:.1f}, '
             f'n={tps["n"]})</span>')
    parts = [tau, speed] if primary_tau else [speed, tau]
    vs = m.get("speedup")
    if vs:
        parts.append(f'<span class="stat verdict-{esc(vs["verdict"].replace(" ", "-"))}">speed-up '
                     f'<b>{vs["median"]:.2f}×</b> ({vs["min"]:.2f}–{vs["max"]:.2f}×): {esc(vs["verdict"])}</span>')
    parts.append(f'<span class="sub">{esc(m["device"])}, {esc(m["dtype"])}</span>')
    return '<div class="mmspec-header">' + "".join(parts) + "</div>"


def verdict_text(m: dict) -> str:
    """'draft VLM: τ 2.31, 1.42× (1.20–1.61×) faster' (plain text)."""
    speed, verdict = _speedup(m)
    return f"{m.get('label') or m['method']}: τ {m['tau']:.2f}, {speed} {verdict}"


def notes_html(*paragraphs: str) -> str:
    return '<div class="mmspec-note">' + "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs) + "</div>"


def points(ms: list[dict]) -> list[dict]:
    """Speed-up points for `viz.charts.speedup_spread_figure` (drafters only)."""
    return [{"label": m.get("label") or m["method"], "speedup": m["speedup"]["median"], "lo": m["speedup"]["min"],
             "hi": m["speedup"]["max"], "verdict": m["speedup"]["verdict"], "where": f"{m['device']}, {m['dtype']}"}
            for m in ms if m.get("speedup")]
