"""viz/ on real traces from the engine (tiny models) and on synthetic drafter internals."""
from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser

import plotly.graph_objects as go
import pytest

import tiny_models
from mmspec import DecodeConfig, InputError, generate, load_drafter, load_target
from viz import charts, internals, tokens, traceio, tree_fig

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def runs(tiny_dir):
    target = load_target(str(tiny_dir / "llava"))
    img = tiny_models.image(0)

    def run(drafter, tree, n=40, temperature=0.0):
        return generate(target, load_drafter(drafter, target), img, PROMPT,
                        DecodeConfig(max_new_tokens=n, tree=tree, temperature=temperature))

    return {
        # the target as its own draft model: (nearly) everything is accepted, bonus tokens
        "self": run(str(tiny_dir / "llava"), "dynamic:12,4,3"),
        "self_chain": run(str(tiny_dir / "llava"), "chain:3"),
        # random drafts: (nearly) everything is rejected, corrections
        "random": run("random", "dynamic:10,3,2"),
        "random_chain": run("random", "chain:4"),
        "ngram": run("ngram", "chain:4"),
        "vanilla": run("vanilla", "chain:4"),
    }


# ------------------------------------------------------------------ tokens HTML

class SpanCounter(HTMLParser):
    """Counts top-level token spans by fate class and collects their titles."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.titles: list[str] = []
        self.order: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "span" and "tok" in classes:
            fate = next(c[4:] for c in classes if c.startswith("tok-"))
            self.counts[fate] = self.counts.get(fate, 0) + 1
            self.titles.append(a.get("title", ""))
            self.order.append(fate)


def expected_counts(gen):
    """Fates counted straight from the trace, independently of viz.tokens."""
    c = dict.fromkeys(("accepted", "correction", "bonus", "target", "rejected"), 0)
    for s in gen.steps:
        n_new = len(s.new_tokens)
        if s.kind != "draft" or len(s.tree) == 0:
            c["target"] += n_new
            continue
        acc = min(len(s.accepted), n_new)
        c["accepted"] += acc
        if n_new > acc:
            c[s.next_kind if s.next_kind in ("bonus", "correction") else "target"] += n_new - acc
            if s.next_kind == "correction":
                node = s.accepted[-1] if s.accepted else -1
                while node in s.tree.parents:  # first-ranked child chain under the rejection point
                    node = s.tree.parents.index(node)
                    c["rejected"] += 1
    return c


@pytest.mark.parametrize("name", ["self", "self_chain", "random", "random_chain", "ngram", "vanilla"])
def test_one_span_per_token_with_its_fate(runs, name):
    gen = runs[name]
    p = SpanCounter()
    p.feed(tokens.tokens_html(gen))
    want = expected_counts(gen)
    got = {k: p.counts.get(k, 0) for k in want}
    assert got == want
    committed = sum(v for k, v in got.items() if k != "rejected")
    assert committed == len(gen.token_ids) == gen.stats.new_tokens
    assert tokens.fate_counts(gen) == want


def test_traces_cover_every_fate(runs):
    """The fixtures really exercise accepts, bonuses, rejections and corrections."""
    self_counts, rand_counts = tokens.fate_counts(runs["self"]), tokens.fate_counts(runs["random_chain"])
    assert self_counts["accepted"] > 10 and self_counts["bonus"] > 3
    assert rand_counts["correction"] > 10 and rand_counts["rejected"] > 10
    assert rand_counts["accepted"] <= 2


def test_tooltips_carry_q_p_ratio_step_depth(runs):
    p = SpanCounter()
    p.feed(tokens.tokens_html(runs["random_chain"]))
    rejected = [t for t, f in zip(p.titles, p.order) if f == "rejected"]
    assert rejected and all("draft q = " in t and "target p = " in t and "min(1, p/q) = " in t for t in rejected)
    assert all(re.search(r"step \d+ · depth \d+", t) for t in rejected)
    p = SpanCounter()
    p.feed(tokens.tokens_html(runs["self"]))
    accepted = [t for t, f in zip(p.titles, p.order) if f == "accepted"]
    assert accepted and all("min(1, p/q) = " in t for t in accepted)


def test_escaping(runs):
    gen = copy.deepcopy(runs["self"])
    step = gen.steps[1]
    step.new_texts[0] = "<b>&"
    step.node_texts[step.accepted[0]] = "<b>&"
    step.new_texts[1] = 'a"\nb\x03'
    out = tokens.tokens_html(gen)
    assert "<b>&" not in out
    assert "&lt;b&gt;&amp;" in out
    assert "⏎\n" in out and "\\x03" in out  # newline visible (and still breaks the line), control byte as \xNN
    p = SpanCounter()
    p.feed(out)  # the escaped title attributes still parse into the same number of spans
    assert sum(p.counts.values()) == sum(tokens.fate_counts(gen).values())
    assert any("‘<b>&’" in t for t in p.titles)  # the parser unescapes the attribute back
    assert tokens.token_html("") == '<span class="tok-byte">∅</span>'
    assert tokens.visible_text("a\tb\n") == "a⇥b⏎"


def test_live_step_spans_concatenate_to_the_whole(runs):
    gen = runs["random"]
    spans = tokens.step_spans(gen)
    assert len(spans) == len(gen.steps)
    assert "".join(spans) == tokens.tokens_html(gen, wrap=False)
    assert tokens.tokens_html(gen).startswith('<div class="mmspec-tokens">')


def test_diff(runs):
    van, spec = runs["vanilla"], runs["self"]
    assert van.token_ids == spec.token_ids  # lossless at temperature 0
    assert "identical" in tokens.diff_html(van, spec)
    other = copy.deepcopy(spec)
    other.token_ids[5] = (other.token_ids[5] + 1) % 300
    assert tokens.first_divergence(van.token_ids, other.token_ids) == 5
    out = tokens.diff_html(van, other)
    assert "differs at token 5" in out and "tok-diverge" in out
    assert tokens.first_divergence([1, 2], [1, 2, 3]) == 2
    assert "Needs both" in tokens.diff_html(None, spec)


# ------------------------------------------------------------------ tree figure

def _trace(fig: go.Figure, name: str):
    return next(t for t in fig.data if t.name == name)


@pytest.mark.parametrize("name", ["self", "random", "random_chain", "ngram"])
def test_tree_figure_nodes_and_accepted_path(runs, name):
    gen = runs[name]
    for step in gen.steps:
        fig = tree_fig.tree_figure(gen, step.index)
        nodes = _trace(fig, "nodes")
        assert len(nodes.x) == len(step.tree) + 1  # one per draft token, plus the root
        status = list(nodes.customdata)
        assert status[0] == "root"
        assert status.count("accepted") == len(step.accepted)
        assert [i for i, s in enumerate(status[1:]) if s == "accepted"] == sorted(step.accepted)
        path = _trace(fig, "accepted path")
        assert list(path.customdata) == [-1] + list(step.accepted)
        # every node has a labelled box, plus the target's next token when it was committed
        has_next = len(step.new_tokens) > len(step.accepted)
        assert len(fig.layout.annotations) == len(step.tree) + 1 + has_next
        if has_next:
            assert list(_trace(fig, "next token").customdata)[0] in ("bonus", "correction", "target")


def test_tree_figure_marks_rejections_and_target_tokens(runs):
    gen = runs["random"]
    step = next(s for s in gen.steps if s.kind == "draft" and s.next_kind == "correction" and len(s.tree) > 2)
    fig = tree_fig.tree_figure(gen, step.index)
    status = list(_trace(fig, "nodes").customdata)
    assert "rejected" in status
    labels = [a.text for a in fig.layout.annotations]
    assert any(lab.startswith("<s>") and "target:" in lab for lab in labels)  # struck through, target's token shown
    assert "correction" in labels[-1]
    assert tree_fig.node_status(step).count("rejected") >= 1


def test_tree_layout_centres_parents():
    ys, xs = tree_fig.tree_layout([-1, -1, 0, 0, 1])
    assert xs == [0, 1, 1, 2, 2, 2]
    assert ys[1] == (ys[3] + ys[4]) / 2 and ys[2] == ys[5]
    ys, xs = tree_fig.tree_layout([], extra_child_of=-1)
    assert xs == [0, 1]


def test_pick_step_prefers_long_accepts(runs):
    gen = runs["self"]
    best = tree_fig.pick_step(gen)
    assert len(gen.steps[best].accepted) == max(len(s.accepted) for s in gen.steps)


# ------------------------------------------------------------------ charts

def test_charts(runs):
    gen = runs["self"]
    fig = charts.acceptance_by_depth_figure(gen)
    assert list(fig.data[0].y) == gen.stats.acceptance_by_depth
    hist = charts.accepted_length_figure(gen)
    assert sum(hist.data[0].y) == gen.stats.steps
    assert charts.accepted_length_figure(runs["vanilla"]).data == ()  # empty figure with a note
    row = charts.summary_row(1, runs["vanilla"], gen)
    assert row["output"] == "identical" and row["τ"] == round(gen.stats.tau, 2)
    table = charts.summary_table([row])
    assert len(table[0]) == len(charts.SUMMARY_HEADERS)
    assert len(charts.summary_figure([row]).data) == 1
    assert row["verdict"] == "one run"  # a single timing is never given a verdict
    van = {"tokens_per_s": {"median": 40.0}}
    spec = {"tokens_per_s": {"median": 50.0}, "speedup": {"median": 1.25, "verdict": "within noise"}}
    row = charts.summary_row(2, runs["vanilla"], gen, measured=(van, spec))  # the medians of repeated runs
    assert (row["vanilla tok/s"], row["spec tok/s"], row["speed-up"], row["verdict"]) == (40.0, 50.0, 1.25,
                                                                                          "within noise")


# ------------------------------------------------------------------ internals (synthetic: feature drafters land later)

INFO = {"name": "eagle-vlm", "kind": "feature", "entropy_profile": [2.0, 1.8, 1.5, 1.1, 0.9, 0.8],
        "chosen_layers": [1, 4], "compression": {"kept": 0.25, "merged": 0.5}}
VMAP = {"grid": [3, 4], "status": ["kept", "merged", "dropped", "kept"] * 3}


def test_entropy_figure():
    fig = internals.entropy_figure(INFO)
    line = _trace(fig, "attention entropy")
    assert list(line.y) == INFO["entropy_profile"]
    chosen = _trace(fig, "chosen layers")
    assert list(chosen.x) == [1, 4]
    assert "chosen: 1, 4" in fig.layout.title.text
    assert "no per-layer" in internals.entropy_figure({}).layout.annotations[0].text.lower()


def test_visual_map_figure():
    img = tiny_models.image(3, size=64)
    fig = internals.visual_map_figure(img, VMAP)
    heat = _trace(fig, "visual tokens")
    assert len(heat.z) == 3 and len(heat.z[0]) == 4
    assert [list(r) for r in heat.z][0] == [0, 1, 2, 0]
    assert "6 kept · 3 merged · 3 dropped of 12" in fig.layout.title.text
    assert _trace(fig, "image") is not None
    blank = internals.visual_map_figure(None, VMAP)  # offline replay without the picture
    assert _trace(blank, "no image") is not None
    bad = internals.visual_map_figure(img, {"grid": [2, 2], "status": ["kept"]})
    assert "Unreadable" in bad.layout.annotations[0].text


def test_find_visual_map(runs):
    gen = copy.deepcopy(runs["random"])
    assert internals.find_visual_map(gen) is None
    gen.drafter_info = dict(INFO)
    gen.steps[2].extras = {"visual_map": VMAP}
    assert internals.find_visual_map(gen, 0) == VMAP  # falls back to the first step that has one
    assert internals.find_visual_map(gen, 2) == VMAP


# ------------------------------------------------------------------ race replay and trace files

def test_trace_roundtrip(runs, tmp_path):
    bundle = traceio.Bundle(runs["vanilla"], runs["random"], tiny_models.image(1), {7: "x"})
    path = traceio.save(bundle, tmp_path / "t.json")
    back = traceio.load(path)
    assert back.vanilla.token_ids == runs["vanilla"].token_ids
    assert back.speculative.steps[3].tree == runs["random"].steps[3].tree
    assert back.image is not None and back.token_texts == {7: "x"}
    assert tokens.tokens_html(back.speculative) == tokens.tokens_html(runs["random"])
    # a single saved Generation is accepted too
    single = tmp_path / "single.json"
    single.write_text(runs["self"].to_json())
    one = traceio.load(single)
    assert one.vanilla is None and one.speculative.token_ids == runs["self"].token_ids
    for bad in ("not json", json.dumps([1, 2]), json.dumps({"vanilla": {"steps": []}}), json.dumps({"a": 1})):
        f = tmp_path / "bad.json"
        f.write_text(bad)
        with pytest.raises(InputError):
            traceio.load(f)


def test_saved_benchmark_figures_are_labelled(tmp_path):
    """The Benchmarks tab: the repository's saved figures load, projections are captioned as such,
    measurements name their hardware, and a broken file is skipped rather than breaking the app."""
    from viz.bench import saved_figures

    saved = {f.name: f for f in saved_figures()}
    assert {"speed_h100", "speed_cpu", "scale_h100"} <= set(saved)
    assert "Projection, not a measurement" in saved["scale_h100"].caption
    assert "projection" in saved["scale_h100"].figure.layout.title.text.lower()
    assert "Measured" in saved["speed_h100"].caption and "H100" in saved["speed_h100"].caption
    assert all(len(f.figure.data) > 0 for f in saved.values())
    assert list(saved)[-1] == "scale_h100"  # measurements first
    (tmp_path / "broken.fig.json").write_text("{not json")
    (tmp_path / "speed_x.fig.json").write_text(saved["speed_cpu"].figure.to_json())
    assert [f.name for f in saved_figures(tmp_path)] == ["speed_x"]


def test_numbers_from_a_trace_are_escaped_where_drawn(runs):
    """The schema refuses text in numeric fields; rendering escapes them anyway (the three holes the
    issue found: a tree's depths, token ids in the diff, a vanilla step's index)."""
    bad = '<img src=x onerror="alert(1)">'
    spec, van = copy.deepcopy(runs["self"]), copy.deepcopy(runs["vanilla"])
    step = next(s for s in spec.steps if s.accepted)
    step.tree.depths[step.accepted[0]] = bad
    step.tree.tokens[step.accepted[0]] = bad
    van.steps[1].index = bad
    spec.token_ids[3] = bad
    out = [tokens.tokens_html(spec), tokens.tokens_html(van), tokens.diff_html(van, spec)]
    fig = tree_fig.tree_figure(spec, spec.steps.index(step))
    out += [str(t.hovertext) for t in fig.data] + [a.text + str(a.hovertext) for a in fig.layout.annotations]
    assert all("<img" not in o for o in out)
    assert sum("&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in o for o in out) >= 3


def test_compression_maps_say_what_was_merged_into_what():
    """Pool: lines between the groups merged into one entry; queries (ViSpec): every token merged, said in
    words, the target's attention as shading; the hover names each token's entry and weight."""
    pool = {"grid": [4, 4], "status": ["merged"] * 16, "mode": "pool",
            "groups": [(r // 2) * 2 + c // 2 for r in range(4) for c in range(4)]}
    fig = internals.visual_map_figure(None, pool)
    lines = _trace(fig, "merged together")
    assert sum(x is None for x in lines.x) == 8  # 2 inner borders × 4 cells, each one segment
    assert "averaged into 4 entries of about 4 tokens" in fig.layout.title.text
    assert "into entry 3 (4 tokens)" in _trace(fig, "visual tokens").customdata[3][3]
    queries = {"grid": [2, 2], "status": ["merged"] * 4, "mode": "queries", "groups": [0] * 4,
               "saliency": [0.1, 0.4, 0.2, 0.3]}
    fig = internals.visual_map_figure(None, queries)
    heat = _trace(fig, "visual tokens")
    assert [list(r) for r in heat.z] == [pytest.approx([0.25, 1.0]), pytest.approx([0.5, 0.75])]  # attention / max
    assert "All 4 visual tokens are compressed" in fig.layout.title.text and "&#x27;" not in fig.layout.title.text
    assert "attention 0.4000" in heat.customdata[0][1]
    assert "2 visual tokens the target attends to most" in internals.visual_map_summary(
        {"grid": [2, 2], "status": ["kept", "dropped", "kept", "dropped"], "mode": "topk"})


def test_best_result_set_per_hardware_this_session_first(tmp_path):
    """The Benchmarks tab: one file per machine (the fullest), the session's own hardware first."""
    import json

    from viz import bench

    def write(name, meta, n):
        rows = [{"method": "engine:vanilla", "temperature": 0.0, "tokens_per_s": 1.0}] * n
        (tmp_path / f"speed_{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}))

    write("h100", {"hardware": "NVIDIA H100 80GB HBM3", "device": "cuda"}, 3)
    write("h100_more", {"hardware": "NVIDIA H100 80GB HBM3", "device": "cuda"}, 5)
    write("cpu", {"hardware": "CPU x86_64", "device": "cpu"}, 2)
    assert [r.name for r in bench.best_result_sets("cpu", tmp_path)] == ["speed_cpu", "speed_h100_more"]
    assert [r.name for r in bench.best_result_sets("cuda", tmp_path)][0] == "speed_h100_more"


def test_diff_shows_the_end_of_text_as_a_marker(runs):
    """A divergence near the end: the end-of-text token is an end marker in both sides, never its text."""
    van, spec = copy.deepcopy(runs["vanilla"]), copy.deepcopy(runs["self"])
    for g in (van, spec):
        next(s for s in reversed(g.steps) if s.new_tokens).new_texts[-1] = "</s>"
    spec.token_ids[-2] += 1  # the runs differ just before the end
    out = tokens.diff_html(van, spec)
    assert f"differs at token {len(spec.token_ids) - 2}" in out
    assert "&lt;/s&gt;" not in out and "</s>" not in out and out.count('class="tok tok-end"') == 2


def test_step_line_marks_the_end_of_text(runs):
    gen = copy.deepcopy(runs["self"])
    last = max(i for i, s in enumerate(gen.steps) if s.new_tokens)
    gen.steps[last].new_texts[-1] = "</s>"
    line = tree_fig.step_text(gen, last)
    assert "■ end" in line and "&lt;/s&gt;" not in line and "</s>" not in line
