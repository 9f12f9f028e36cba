"""The draft tree of one step as a plotly figure (root on the left, depth to the right).

Each node is a labelled box (token, draft prob q), the accepted path is green, rejected candidates
(whose parent was accepted) are struck through in vermillion, nodes the target never had to look at
(under a rejected node) are faded, and the target's own next token (bonus or correction) hangs off
the end of the accepted path. Where the target would have said something else, the box says so.

The trace named "nodes" has exactly one point per draft node plus the root (point 0), with the
node status in `customdata`; the trace "accepted path" holds the root and the accepted nodes.
"""
from __future__ import annotations

import plotly.graph_objects as go

from mmspec.trace import Generation, StepRecord
from viz.style import BLUE, FONT_COLOUR, GREEN, GREY, ORANGE, RED, empty_figure, style_figure
from viz.tokens import esc, token_vocab, visible_text

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


def tree_figure(gen: Generation, step_index: int, vocab: dict[int, str] | None = None) -> go.Figure:
    """Figure of `gen.steps[step_index]`'s draft tree and verification."""
    if not gen.steps:
        return empty_figure("This run has no steps.")
    step_index = max(0, min(step_index, len(gen.steps) - 1))
    step = gen.steps[step_index]
    vocab = vocab if vocab is not None else token_vocab(gen)
    tree = step.tree
    n = len(tree)
    status = node_status(step)
    prev_text = gen.steps[step_index - 1].new_texts[-1] if step_index > 0 and gen.steps[step_index - 1].new_texts else ""
    last = step.accepted[-1] if step.accepted else -1
    has_next = bool(step.new_tokens) and len(step.new_tokens) > len(step.accepted)
    next_kind = step.next_kind if step.next_kind in ("bonus", "correction") else "target"
    ys, xs = tree_layout(tree.parents, last if has_next else None)

    fig = go.Figure()
    # edges, by class
    edge_style = {
        "accepted": dict(color=GREEN, width=3.5),
        "rejected": dict(color=RED, width=1.5, dash="dot"),
        "unreached": dict(color=GREY, width=1),
        "next": dict(color=BLUE if next_kind == "bonus" else ORANGE, width=2.5, dash="dash"),
    }
    edges: dict[str, tuple[list, list]] = {k: ([], []) for k in edge_style}
    for i, p in enumerate(tree.parents):
        ex, ey = edges[status[i]]
        ex += [xs[p + 1], xs[i + 1], None]
        ey += [ys[p + 1], ys[i + 1], None]
    if has_next:
        ex, ey = edges["next"]
        ex += [xs[last + 1], xs[n + 1], None]
        ey += [ys[last + 1], ys[n + 1], None]
    for k, (ex, ey) in edges.items():
        if ex:
            fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=edge_style[k], hoverinfo="skip",
                                     showlegend=False, name=f"edges {k}"))

    # node boxes (annotations) and an invisible hover layer ("nodes")
    hover = [f"<b>root</b>: {esc(visible_text(prev_text))}<br>{STATUS_LABEL['root']}"]
    labels = [f"{esc(_short(prev_text))}"]
    for i in range(n):
        tok_txt = step.node_texts[i] if i < len(step.node_texts) else str(tree.tokens[i])
        q = tree.draft_probs[i]
        p = step.target_probs[i] if i < len(step.target_probs) else None
        want_id = step.target_tokens[i] if i < len(step.target_tokens) else None
        want = vocab.get(want_id, f"#{want_id}") if want_id is not None else None
        lines = [f"<b>{esc(visible_text(tok_txt))}</b> (id {esc(tree.tokens[i])}) · depth {esc(tree.depths[i])}",
                 STATUS_LABEL[status[i]], f"draft q = {q:.3f}"]
        if p is not None:
            lines.append(f"target p = {p:.3f} · min(1, p/q) = {_ratio(p, q)}")
        if want is not None:
            lines.append(f"target's top token here: {esc(visible_text(want))}")
        hover.append("<br>".join(lines))
        label = esc(_short(tok_txt))
        if status[i] == "rejected":
            label = f"<s>{label}</s>"
        label += f"<br><span style='font-size:10px'>q {q:.2f}</span>"
        if status[i] == "rejected" and want_id is not None and want_id != tree.tokens[i]:
            label += f"<br><span style='font-size:10px'>target: {esc(_short(want, 10))}</span>"
        labels.append(label)
    node_status_all = ["root"] + status
    fig.add_trace(go.Scatter(
        x=xs[: n + 1], y=ys[: n + 1], mode="markers", name="nodes",
        marker=dict(size=30, color="rgba(0,0,0,0)", symbol="square"),
        customdata=node_status_all, hovertext=hover, hoverinfo="text", showlegend=False,
    ))
    acc_idx = [0] + [a + 1 for a in step.accepted]
    fig.add_trace(go.Scatter(
        x=[xs[j] for j in acc_idx], y=[ys[j] for j in acc_idx], mode="markers", name="accepted path",
        marker=dict(size=6, color=GREEN), customdata=[-1] + list(step.accepted), hoverinfo="skip", showlegend=False,
    ))
    box = {
        "root": dict(bgcolor="rgba(128,128,128,0.18)", bordercolor=FONT_COLOUR),
        "accepted": dict(bgcolor=GREEN, bordercolor=GREEN, font=dict(color="white")),
        "rejected": dict(bgcolor="rgba(213,94,0,0.12)", bordercolor=RED, font=dict(color=RED)),
        "unreached": dict(bgcolor="rgba(0,0,0,0)", bordercolor="rgba(153,153,153,0.5)", opacity=0.5),
    }
    for j, (x, y, lab, st) in enumerate(zip(xs, ys, labels, node_status_all)):
        style = dict(box[st])
        font = style.pop("font", dict(color=FONT_COLOUR))
        fig.add_annotation(x=x, y=y, text=lab, showarrow=False, borderpad=3, borderwidth=1.5,
                           font=dict(size=12, **font), hovertext=hover[j], **style)
    if has_next:
        nt = step.new_texts[len(step.accepted)]
        colour = {"bonus": BLUE, "correction": ORANGE, "target": FONT_COLOUR}[next_kind]
        label = esc(_short(nt))
        label = f"<u>{label}</u>" if next_kind == "bonus" else label
        label += f"<br><span style='font-size:10px'>{next_kind}</span>"
        nhover = f"<b>{esc(visible_text(nt))}</b> (id {esc(step.next_token)})<br>{STATUS_LABEL[next_kind]}"
        fig.add_trace(go.Scatter(x=[xs[n + 1]], y=[ys[n + 1]], mode="markers", name="next token",
                                 marker=dict(size=30, color="rgba(0,0,0,0)", symbol="square"),
                                 customdata=[next_kind], hovertext=[nhover], hoverinfo="text", showlegend=False))
        fig.add_annotation(x=xs[n + 1], y=ys[n + 1], text=label, showarrow=False, borderpad=3, borderwidth=1.5,
                           bgcolor=colour, bordercolor=colour, font=dict(size=12, color="white"), hovertext=nhover)

    rows = max(1, int(round(-min(ys))) + 1)
    max_x = max(xs)
    if step.kind == "prefill":
        title = f"Step {esc(step.index)}: prefill: the prompt forward gives the first token"
    elif n == 0:
        title = f"Step {esc(step.index)}: nothing drafted, the target adds one token"
    else:
        extra = {"bonus": "+ bonus", "correction": "+ correction", "target": "+ target token"}[next_kind]
        title = (f"Step {esc(step.index)}: drafted {n} token{'s' if n != 1 else ''}, accepted {len(step.accepted)} "
                 f"{extra} → {len(step.new_tokens)} committed")
    fig.update_xaxes(tickmode="array", tickvals=list(range(max_x + 1)),
                     ticktext=["root"] + [f"depth {d}" for d in range(1, max_x + 1)],
                     range=[-0.6, max_x + 0.6], showgrid=False, zeroline=False)
    fig.update_yaxes(visible=False, range=[min(ys) - 0.7, max(ys) + 0.7])
    style_figure(fig, title=title, height=max(240, min(1400, 58 * rows + 90)))
    fig.update_layout(hovermode="closest", dragmode="pan")
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
