"""The draft tree of one step as a plotly figure (root on the left, depth to the right).

Each node is a labelled box (token, draft prob q), the accepted path is green, rejected candidates
(whose parent was accepted) are struck through in vermillion, nodes the target never had to look at
(under a rejected node) are faded with a dotted border, and the target's own next token (bonus or
correction) hangs off the end of the accepted path. Where the target would have said something
else, the box says so. The root box reads "root" and the last committed token (or "the prompt").

Layout without overlaps: the axes are in pixels and the figure is sized to them; a subtree takes as
many rows as it has leaves (siblings spaced by subtree width), rows are as tall as the tallest box,
a depth column as wide as its widest box, and edges join a parent's right side to a child's left
side through the empty strip between columns. The boxes are layout shapes named "box J" (J = 0 for
the root, i + 1 for node i, "box next" for the target's token); a legend under the plot names every
status, unreached nodes included.

The trace named "nodes" has exactly one point per draft node plus the root (point 0), with the
node status in `customdata`; the trace "accepted path" holds the root and the accepted nodes.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import plotly.graph_objects as go

from mmspec.trace import Generation, StepRecord
from viz.style import BLUE, FONT_COLOUR, GREEN, GREY, ORANGE, RED, empty_figure, style_figure
from viz.tokens import ends_with_eos, esc, token_vocab, visible_text

STATUS_LABEL = {
    "root": "root (last committed token)",
    "accepted": "accepted",
    "rejected": "rejected by the target",
    "unreached": "not checked (an ancestor was rejected)",
    "bonus": "bonus token from the target",
    "correction": "target's correction",
    "target": "target's token (nothing drafted)",
}


def node_status(step: StepRecord) -> list[str]:
    """Per draft node: accepted, rejected (its parent was reached but it was refused) or unreached."""
    acc = set(step.accepted)
    out = []
    for i, p in enumerate(step.tree.parents):
        if i in acc:
            out.append("accepted")
        elif p == -1 or p in acc:
            out.append("rejected")
        else:
            out.append("unreached")
    return out


def tree_layout(parents: list[int], extra_child_of: int | None = None) -> tuple[list[float], list[int]]:
    """y of [root] + nodes (+ an extra leaf under `extra_child_of`, -1 = root) and depth x.

    Leaves take consecutive rows in depth-first order, a parent sits at the mean of its children.
    Returns (ys, xs) for indices 0 = root, 1..n = nodes, n+1 = the extra leaf if any.
    """
    n = len(parents)
    kids: dict[int, list[int]] = {i: [] for i in range(-1, n + 1)}
    for i, p in enumerate(parents):
        kids[p].append(i)
    if extra_child_of is not None:
        kids[extra_child_of].append(n)  # the extra node has index n
    depth = {-1: 0}
    ys: dict[int, float] = {}
    row = [0]

    def visit(v: int) -> None:
        for c in kids[v]:
            depth[c] = depth[v] + 1
        if not kids[v]:
            ys[v] = row[0]
            row[0] += 1
            return
        for c in kids[v]:
            visit(c)
        ys[v] = sum(ys[c] for c in kids[v]) / len(kids[v])

    visit(-1)
    order = [-1] + list(range(n)) + ([n] if extra_child_of is not None else [])
    return [-ys[v] for v in order], [depth[v] for v in order]


def _short(text: str, limit: int = 14) -> str:
    t = visible_text(text)
    return t if len(t) <= limit else t[: limit - 1] + "…"


def _ratio(p: float, q: float) -> str:
    return f"{min(1.0, p / q):.3f}" if q else "–"


# ---------------------------------------------------------------- geometry (plot units are pixels)
CHAR_PX = 8.0  # widest average glyph at 12 px (a bold token line): boxes are sized from it
SMALL_CHAR_PX = 6.5  # the 10 px lines under the token
LINE_PX = 17.0
PAD_PX = 10.0
COL_GAP_PX = 48.0  # the strip between columns: edges run only there, never across a box
ROW_GAP_PX = 12.0
MARGIN = dict(l=20, r=20, t=64, b=92)  # the top holds modebar + title, the bottom the legend (4 rows)


@dataclass(frozen=True)
class Box:
    """A node box in plot (pixel) coordinates, y upwards."""
    x0: float
    x1: float
    y0: float
    y1: float

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2


def label_size(lines: list[tuple[str, bool]]) -> tuple[float, float]:
    """(width, height) in pixels of a box holding plain-text lines; flag True = a small (10 px) line."""
    width = max((len(t) * (SMALL_CHAR_PX if small else CHAR_PX) for t, small in lines), default=0.0)
    return width + 2 * PAD_PX, len(lines) * LINE_PX + PAD_PX


def layout_boxes(parents: list[int], sizes: list[tuple[float, float]], extra_child_of: int | None = None) -> list[Box]:
    """Boxes of [root] + nodes (+ the extra leaf), sizes in the same order.

    Rows come from `tree_layout` (a subtree takes as many rows as it has leaves, so siblings are
    spaced by their subtrees); every row is as tall as the tallest box and every box of a depth
    column as wide as that column's widest, so boxes cannot overlap and an edge between adjacent
    columns crosses only the empty strip between them."""
    ys, xs = tree_layout(parents, extra_child_of)
    n_cols = max(xs) + 1
    col_w = [max(w for (w, _), x in zip(sizes, xs) if x == c) for c in range(n_cols)]
    row_h = max(h for _, h in sizes) + ROW_GAP_PX
    left = [sum(col_w[:c]) + COL_GAP_PX * c for c in range(n_cols)]
    half = (row_h - ROW_GAP_PX) / 2
    return [Box(left[x], left[x] + col_w[x], y * row_h - half, y * row_h + half) for y, x in zip(ys, xs)]


# ---------------------------------------------------------------- the figure
BOX_STYLE = {  # fill, border, text colour, border dash
    "root": ("rgba(128,128,128,0.18)", FONT_COLOUR, FONT_COLOUR, "solid"),
    "accepted": (GREEN, GREEN, "white", "solid"),
    "rejected": ("rgba(213,94,0,0.12)", RED, RED, "solid"),
    "unreached": ("rgba(0,0,0,0)", "rgba(153,153,153,0.7)", GREY, "dot"),
    "bonus": (BLUE, BLUE, "white", "solid"),
    "correction": (ORANGE, ORANGE, "white", "solid"),
    "target": ("rgba(128,128,128,0.35)", FONT_COLOUR, "white", "solid"),
}
EDGE_STYLE = {
    "accepted": dict(color=GREEN, width=3.5),
    "rejected": dict(color=RED, width=1.5, dash="dot"),
    "unreached": dict(color=GREY, width=1),
}


Label = tuple[str, list[tuple[str, bool]], str]  # (label HTML, its plain lines for sizing, hover HTML)


def _node_label(step: StepRecord, i: int, status: str, vocab: dict[int, str]) -> Label:
    """(label HTML, its plain lines for sizing, hover HTML) of draft node i; texts escaped here, once."""
    tree = step.tree
    tok_txt = step.node_texts[i] if i < len(step.node_texts) else str(tree.tokens[i])
    q = tree.draft_probs[i]
    p = step.target_probs[i] if i < len(step.target_probs) else None
    want_id = step.target_tokens[i] if i < len(step.target_tokens) else None
    want = vocab.get(want_id, f"#{want_id}") if want_id is not None else None
    hover = [f"<b>{html.escape(visible_text(tok_txt))}</b> (id {esc(tree.tokens[i])}) · depth {esc(tree.depths[i])}",
             STATUS_LABEL[status], f"draft q = {q:.3f}"]
    if p is not None:
        hover.append(f"target p = {p:.3f} · min(1, p/q) = {_ratio(p, q)}")
    if want is not None:
        hover.append(f"target's top token here: {html.escape(visible_text(want))}")
    short = _short(tok_txt)
    label = html.escape(short)
    if status == "rejected":
        label = f"<s>{label}</s>"
    lines = [(short, False), (f"q {q:.2f}", True)]
    label += f"<br><span style='font-size:10px'>q {q:.2f}</span>"
    if status == "rejected" and want_id is not None and want_id != tree.tokens[i]:
        lines.append((f"target: {_short(want, 10)}", True))
        label += f"<br><span style='font-size:10px'>target: {html.escape(_short(want, 10))}</span>"
    return label, lines, "<br>".join(hover)


def _root_label(gen: Generation, step_index: int) -> Label:
    """The root is the last committed token; before the first step it is the prompt."""
    prev = gen.steps[step_index - 1].new_texts if step_index > 0 else []
    what = _short(prev[-1]) if prev else "the prompt"
    label = f"root<br><span style='font-size:10px'>{html.escape(what)}</span>"
    hover = f"<b>root</b>: {html.escape(visible_text(prev[-1]) if prev else 'the prompt')}<br>{STATUS_LABEL['root']}"
    return label, [("root", False), (what, True)], hover


def _next_label(step: StepRecord, kind: str) -> Label:
    nt = step.new_texts[len(step.accepted)]
    label = html.escape(_short(nt))
    label = f"<u>{label}</u>" if kind == "bonus" else label
    label += f"<br><span style='font-size:10px'>{kind}</span>"
    hover = f"<b>{html.escape(visible_text(nt))}</b> (id {esc(step.next_token)})<br>{STATUS_LABEL[kind]}"
    return label, [(_short(nt), False), (kind, True)], hover


def _title(step: StepRecord, n: int, next_kind: str) -> str:
    if step.kind == "prefill":
        return f"Step {step.index}: prefill: the prompt forward gives the first token"
    if n == 0:
        return f"Step {step.index}: nothing drafted, the target adds one token"
    committed = len(step.new_tokens)
    if committed <= len(step.accepted):  # end of text (or the token limit) inside the accepted path
        return (f"Step {step.index}: drafted {n}, accepted {len(step.accepted)}; the text ended there → "
                f"{committed} committed")
    extra = {"bonus": "+ bonus", "correction": "+ correction", "target": "+ target token"}[next_kind]
    return (f"Step {step.index}: drafted {n} token{'s' if n != 1 else ''}, accepted {len(step.accepted)} "
            f"{extra} → {committed} committed")


def _add_legend(fig: go.Figure) -> None:
    """Every status, unreached included, as legend-only square markers under the plot."""
    for status in ("root", "accepted", "rejected", "unreached", "bonus", "correction", "target"):
        fill, border, _, _ = BOX_STYLE[status]
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=STATUS_LABEL[status],
                                 showlegend=True, hoverinfo="skip",
                                 marker=dict(symbol="square", size=13, color=fill, line=dict(color=border, width=1.5))))
    fig.update_layout(showlegend=True, legend=dict(orientation="h", x=0, xanchor="left", y=0, yanchor="bottom",
                                                   yref="container", font=dict(size=11), itemclick=False,
                                                   itemdoubleclick=False))


def _add_edges(fig: go.Figure, boxes: list[Box], links: list[tuple[int, int, str]], next_kind: str) -> None:
    """One line trace per edge class, each edge from the parent's right side to the child's left side."""
    styles = dict(EDGE_STYLE, next=dict(color={"bonus": BLUE, "correction": ORANGE}.get(next_kind, GREY), width=2.5,
                                        dash="dash"))
    for kind, style in styles.items():
        ex, ey = [], []
        for a, b, k in links:
            if k == kind:
                ex += [boxes[a].x1, boxes[b].x0, None]
                ey += [boxes[a].cy, boxes[b].cy, None]
        if ex:
            fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=style, hoverinfo="skip", showlegend=False,
                                     name=f"edges {kind}"))


def _add_boxes(fig: go.Figure, boxes: list[Box], status: list[str], parts: list[Label], n_nodes: int) -> None:
    """A rectangle (layout shape "box J"; "box next" past the root and the n_nodes - 1 draft nodes: the
    target's token) and a centred label per box."""
    for j, (box, st, (label, _, hover)) in enumerate(zip(boxes, status, parts)):
        fill, border, colour, dash = BOX_STYLE[st]
        fig.add_shape(type="rect", x0=box.x0, x1=box.x1, y0=box.y0, y1=box.y1, fillcolor=fill, layer="below",
                      line=dict(color=border, width=1.5, dash=dash), name="box next" if j >= n_nodes else f"box {j}")
        fig.add_annotation(x=box.cx, y=box.cy, text=label, showarrow=False, font=dict(size=12, color=colour),
                           hovertext=hover)


def tree_figure(gen: Generation, step_index: int, vocab: dict[int, str] | None = None) -> go.Figure:
    """Figure of `gen.steps[step_index]`'s draft tree and verification."""
    if not gen.steps:
        return empty_figure("This run has no steps.")
    step_index = max(0, min(step_index, len(gen.steps) - 1))
    step = gen.steps[step_index]
    vocab = vocab if vocab is not None else token_vocab(gen)
    n = len(step.tree)
    status = ["root"] + node_status(step)
    last = step.accepted[-1] if step.accepted else -1
    has_next = len(step.new_tokens) > len(step.accepted)
    next_kind = step.next_kind if step.next_kind in ("bonus", "correction") else "target"

    parts = [_root_label(gen, step_index)] + [_node_label(step, i, status[i + 1], vocab) for i in range(n)]
    if has_next:
        parts.append(_next_label(step, next_kind))
        status.append(next_kind)
    boxes = layout_boxes(step.tree.parents, [label_size(lines) for _, lines, _ in parts], last if has_next else None)

    fig = go.Figure()
    links = [(p + 1, i + 1, status[i + 1]) for i, p in enumerate(step.tree.parents)]
    if has_next:
        links.append((last + 1, n + 1, "next"))
    _add_edges(fig, boxes, links, next_kind)
    _add_boxes(fig, boxes, status, parts, n + 1)
    fig.add_trace(go.Scatter(
        x=[b.cx for b in boxes[: n + 1]], y=[b.cy for b in boxes[: n + 1]], mode="markers", name="nodes",
        marker=dict(size=30, color="rgba(0,0,0,0)", symbol="square"), customdata=status[: n + 1],
        hovertext=[h for _, _, h in parts[: n + 1]], hoverinfo="text", showlegend=False,
    ))
    acc_idx = [0] + [a + 1 for a in step.accepted]
    fig.add_trace(go.Scatter(
        x=[boxes[j].x0 for j in acc_idx], y=[boxes[j].cy for j in acc_idx], mode="markers", name="accepted path",
        marker=dict(size=6, color=GREEN), customdata=[-1] + list(step.accepted), hoverinfo="skip", showlegend=False,
    ))
    if has_next:
        fig.add_trace(go.Scatter(x=[boxes[-1].cx], y=[boxes[-1].cy], mode="markers", name="next token",
                                 marker=dict(size=30, color="rgba(0,0,0,0)", symbol="square"),
                                 customdata=[next_kind], hovertext=[parts[-1][2]], hoverinfo="text", showlegend=False))
    _add_legend(fig)
    return _frame(fig, boxes, _title(step, n, next_kind))


def _frame(fig: go.Figure, boxes: list[Box], title: str) -> go.Figure:
    """Axes in pixels with the figure sized to match, so the geometry of `layout_boxes` is what shows:
    a figure wider than the tree (for its title and legend) extends the x range instead of stretching."""
    x0, x1 = min(b.x0 for b in boxes) - 8, max(b.x1 for b in boxes) + 8
    y0, y1 = min(b.y0 for b in boxes) - 8, max(b.y1 for b in boxes) + 8
    # About 7 px per title character at 14 px; the legend needs about 560 px for two entries a row.
    plot_w = max(int(x1 - x0), 7 * len(title), 560)
    fig.update_xaxes(visible=False, range=[x0, x0 + plot_w])
    fig.update_yaxes(visible=False, range=[y0, y1])
    style_figure(fig, title=title)
    fig.update_layout(margin=MARGIN, width=plot_w + MARGIN["l"] + MARGIN["r"],
                      height=int(y1 - y0) + MARGIN["t"] + MARGIN["b"], hovermode="closest", dragmode="pan")
    # The title sits under the modebar's strip (the top 30 px), so the two never overlap.
    fig.update_layout(title=dict(yref="container", y=1, yanchor="top", pad=dict(t=34)))
    return fig


def pick_step(gen: Generation) -> int:
    """A step worth showing first: the earliest one with the longest accepted path (else the first draft)."""
    best, best_len = 0, -1
    for s in gen.steps:
        if s.kind == "prefill":
            continue
        score = len(s.accepted) * 1000 + min(len(s.tree), 999)
        if score > best_len:
            best, best_len = s.index, score
    return best


def step_text(gen: Generation | None, index: int) -> str:
    """One step of a run in a line of Markdown (numbers from the trace escaped here)."""
    if gen is None or not gen.steps:
        return "_No run yet._"
    s = gen.steps[max(0, min(index, len(gen.steps) - 1))]
    texts = list(s.new_texts)
    last = next((x for x in reversed(gen.steps) if x.new_tokens), None)
    if texts and s is last and ends_with_eos(gen, None):
        texts[-1] = " ■ end"  # the end of text is a marker, never text (e.g. a literal </s>)
    committed = "".join(texts)
    nk = {"bonus": "bonus", "correction": "correction", "target": "target token"}.get(s.next_kind, s.next_kind)
    return (f"**Step {esc(s.index)}** of {len(gen.steps) - 1} ({esc(s.kind)}) · drafted **{len(s.tree)}** · "
            f"accepted **{len(s.accepted)}** · then {esc(nk)} · "
            f"committed <code>{esc(visible_text(committed))}</code> · "
            f"draft {s.draft_ms:.1f} ms · verify {s.verify_ms:.1f} ms · step {s.step_ms:.1f} ms · t = {s.elapsed_s:.3f} s")
