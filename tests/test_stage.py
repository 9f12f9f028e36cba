"""Issue 17's Gradio-free parts: the measurement protocol, the race of several runs, the tree layout,
benchmark labels, drafter cards and the out-of-world check.

Traces are built by hand so that every fate, EOS position and timing is known (one test runs the
engine on a tiny LLaVA); no test compares two measured timings (fake decodes return the timings
they are told to)."""
from __future__ import annotations

import itertools
import random

import pytest

from mmspec.trace import DraftTree, Generation, StepRecord, compute_stats
from webui import measure
from viz import race

EOS = 2


def step(index, new, texts=None, kind="draft", accepted=(), tree_n=0, next_kind="target", t=0.0):
    """A StepRecord committing `new`; a chain tree of `tree_n` nodes whose first `accepted` are taken."""
    tree = DraftTree(list(range(100, 100 + tree_n)), list(range(-1, tree_n - 1)), list(range(1, tree_n + 1)),
                     [0.5] * tree_n)
    return StepRecord(index, kind, tree, [f"d{i}" for i in range(tree_n)], [7] * tree_n, ["x"] * tree_n,
                      [0.4] * tree_n, list(accepted), new[-1] if new else 0, next_kind, "", list(new),
                      list(texts or [f"w{x}" for x in new]), 0.1, 0.2, 0.4, t)


def gen_of(steps, wall, mode="speculative", max_new=64, temperature=0.0, device="cpu", dtype="float32"):
    ids = [x for s in steps for x in s.new_tokens]
    cfg = {"max_new_tokens": max_new, "temperature": temperature, "device": device, "dtype": dtype,
           "drafter": "x", "tree": "chain:3"}
    return Generation(mode, cfg, "p", 5, ids, "", steps, compute_stats(steps, wall))


def spec_run(wall=1.0, eos=True):
    """prefill; 2 accepted + bonus; 1 accepted + correction; 0 accepted + correction (EOS if asked)."""
    steps = [
        step(0, [10], kind="prefill", t=0.1 * wall),
        step(1, [11, 12, 13], accepted=[0, 1], tree_n=2, next_kind="bonus", t=0.4 * wall),
        step(2, [14, 15], accepted=[0], tree_n=3, next_kind="correction", t=0.7 * wall),
        step(3, [EOS if eos else 16], texts=["</s>" if eos else "w16"], tree_n=2, next_kind="correction", t=wall),
    ]
    return gen_of(steps, wall, max_new=64 if eos else 7)


def vanilla_run(n=7, wall=2.0, eos=True):
    toks = list(range(10, 10 + n - 1)) + [EOS if eos else 99]
    steps = [step(i, [x], texts=["</s>" if (eos and x == EOS) else f"w{x}"], kind="prefill" if i == 0 else "vanilla",
                  t=wall * (i + 1) / n) for i, x in enumerate(toks)]
    return gen_of(steps, wall, mode="vanilla", max_new=64 if eos else n)


# ------------------------------------------------------------------ measurement protocol

def fake_decode(make, walls):
    """A decode function whose k-th call returns make(wall) with the k-th wall time (k=0: warm-up)."""
    it = iter(walls)
    return lambda: make(next(it))


def test_warmup_is_discarded_and_spread_is_reported():
    seen = []
    m = measure.measure("spec", fake_decode(spec_run, [50.0, 1.0, 2.0, 4.0]), repeats=3,
                        on_run=lambda i, g: seen.append((i, g.stats.wall_s)))
    assert seen == [(1, 1.0), (2, 2.0), (3, 4.0)]
    assert len(m.runs) == 3 and [g.stats.wall_s for g in m.runs] == [1.0, 2.0, 4.0]  # the 50 s warm-up is gone
    assert m.wall_s.median == 2.0 and (m.wall_s.lo, m.wall_s.hi) == (1.0, 4.0)
    assert m.tokens_per_s.median == pytest.approx(7 / 2.0)
    assert m.tau == pytest.approx(6 / 3) and m.accepted_per_step == pytest.approx(1.0)
    assert (m.device, m.dtype) == ("cpu", "float32") and m.repeatable is True
    assert m.representative.stats.wall_s == 2.0
    with pytest.raises(ValueError):
        measure.measure("spec", fake_decode(spec_run, [1.0] * 3), repeats=2)


def test_within_noise_and_clear_verdicts():
    van = measure.summarise("vanilla", [vanilla_run(wall=w) for w in (2.0, 2.2, 2.6)])  # 2.69-3.5 tok/s
    # median 3.5 tok/s vs vanilla's 3.18: a 1.1x "speed-up" whose runs overlap vanilla's
    noisy = measure.compare(measure.summarise("ngram", [spec_run(wall=w) for w in (1.8, 2.0, 2.4)]), van)
    assert noisy.verdict == "within noise" and noisy.speedup > 1 and noisy.speedup_lo < 1 < noisy.speedup_hi
    clear = measure.compare(measure.summarise("vlm", [spec_run(wall=w) for w in (0.9, 1.0, 1.1)]), van)
    assert clear.verdict == "faster" and clear.speedup_lo > 1
    slow = measure.compare(measure.summarise("vlm", [spec_run(wall=w) for w in (4.0, 5.0, 6.0)]), van)
    assert slow.verdict == "slower" and slow.speedup_hi < 1
    assert "within noise" in noisy.text() and "cpu, float32" in noisy.text()


def random_drafter_run(wall):
    """tau 1.00: every draft rejected, one correction per forward; stopped by its 7-token limit."""
    steps = [step(0, [10], kind="prefill", t=wall / 7)]
    steps += [step(i, [10 + i], tree_n=3, next_kind="correction", t=wall * (i + 1) / 7) for i in range(1, 7)]
    return gen_of(steps, wall, max_new=7)


@pytest.mark.parametrize("seed", range(20))
def test_random_drafter_never_faster_beyond_its_spread(seed):
    """Timings drawn from one distribution for both (a busy CPU): whatever the medians say, the
    random drafter is not called faster, and its lower bound never clears 1."""
    rng = random.Random(seed)
    draw = lambda: [rng.uniform(1.0, 3.0) for _ in range(4)]  # noqa: E731
    van = measure.summarise("vanilla", [vanilla_run(wall=w) for w in draw()[1:]])
    rnd = measure.summarise("random", [random_drafter_run(w) for w in draw()[1:]])
    assert rnd.tau == pytest.approx(1.0) and rnd.accepted_per_step == pytest.approx(0.0)
    c = measure.compare(rnd, van)
    if rnd.tokens_per_s.overlaps(van.tokens_per_s):
        assert c.verdict == "within noise" and c.speedup_lo <= 1.0
    else:
        assert c.verdict in ("faster", "slower")


def test_greedy_repeats_must_agree_and_rows_carry_device():
    other = spec_run(wall=1.0)
    other.token_ids = other.token_ids[:-1] + [17]
    m = measure.summarise("spec", [spec_run(1.0), spec_run(1.1), other])
    assert m.repeatable is False
    row = measure.table_row(m, measure.compare(m, m))
    assert row["same tokens every run"] == "NO" and row["device"] == "cpu, float32"
    assert "n=3" in row["tokens/s median (min–max)"] and row["τ (tokens / forward)"] == "2.00"
    sampled = measure.summarise("spec", [gen_of(spec_run().steps, 1.0, temperature=1.0)] * 3)
    assert sampled.repeatable is None
    gpu = measure.summarise("v", [vanilla_run(wall=1.0)] * 3)
    gpu.device = "cuda"
    assert not measure.compare(m, gpu).same_device
    assert "τ − 1" in measure.TAU_DOC and "overlap" in measure.VERDICT_DOC


def test_quantile_matches_linear_interpolation():
    assert measure.quantile([1, 2, 3, 4], 0.5) == 2.5
    assert measure.quantile([5.0], 0.9) == 5.0
    assert measure.quantile([0, 10], 0.1) == pytest.approx(1.0)


# ------------------------------------------------------------------ race of several runs

def test_race_fates_and_end_marker():
    toks = race.race_tokens(spec_run())
    assert [t.fate for t in toks] == ["target", "accepted", "accepted", "bonus", "accepted", "correction", "end"]
    # cut at the token limit: the last token is content, no end marker
    assert race.race_tokens(spec_run(eos=False))[-1].fate == "correction"
    assert race.race_tokens(vanilla_run())[-1].fate == "end"
    assert {t.fate for t in race.race_tokens(vanilla_run())[:-1]} == {"target"}


def test_tokens_after_eos_never_drawn():
    """An uploaded trace may carry EOS accepted mid-path and tokens after it."""
    g = spec_run(eos=False)
    g.steps[1].new_tokens = [11, EOS, 13]
    g.steps[1].new_texts = ["w11", "</s>", "w13"]
    toks = race.race_tokens(g, eos_ids={EOS})
    assert [t.fate for t in toks] == ["target", "accepted", "end"]


def test_race_frames_fill_progressively_on_a_slowed_clock():
    runs = [("vanilla", vanilla_run(wall=0.5)), ("draft VLM", spec_run(wall=0.2)),
            ("n-gram", spec_run(wall=0.3, eos=False)), ("random", random_drafter_run(0.4))]
    r = race.race(runs, fps=10, min_s=8, max_s=20)
    assert r.duration_s == pytest.approx(8.0) and r.stretch == pytest.approx(16.0)
    assert r.frames[0].clock_s == 0 and r.frames[-1].real_s == pytest.approx(0.5)
    for a, b in itertools.pairwise(r.frames):
        assert b.clock_s > a.clock_s and b.real_s >= a.real_s
        assert all(len(pb.tokens) >= len(pa.tokens) for pa, pb in zip(a.panes, b.panes))
    last = r.frames[-1]
    assert all(p.finished for p in last.panes)
    assert [len(p.tokens) for p in last.panes] == [len(race.race_tokens(g)) for _, g in runs]
    assert [p.ended for p in last.panes] == [True, True, False, False]
    mid = r.frames[len(r.frames) // 2]  # real 0.25 s: the 0.2 s run done, the others not
    assert [p.finished for p in mid.panes] == [False, True, False, False]
    assert mid.panes[1].real_s == pytest.approx(0.2)  # a finished pane's clock stops at its own end
    assert "measured 0.250 s" in race.clock_text(mid, r.stretch) and "16.0× slower" in race.clock_text(mid, r.stretch)
    assert set(race.acceptance_overlay(r)) == {"draft VLM", "n-gram", "random"}
    faster = race.race(runs, fps=10, speed=2.0)
    assert faster.duration_s == pytest.approx(4.0)
    with pytest.raises(ValueError):
        race.race(runs + [("fifth", spec_run())])
    assert race.stretch_for(60.0) == pytest.approx(20 / 60)  # long runs are sped up to fit 20 s


def test_race_pane_html_escapes_once_and_marks_the_end():
    g = spec_run()
    g.steps[1].new_texts[0] = "<b>&"
    pf = race.race([("a<i>", g)]).frames[-1].panes[0]
    out = race.pane_html(pf)
    assert "&lt;b&gt;&amp;" in out and "&amp;lt;" not in out and "<b>" not in out
    assert "a&lt;i&gt;" in out and "</s>" not in out and "&lt;/s&gt;" not in out
    assert out.count("tok-end") == 1 and out.index("tok-end") > out.rindex("tok-correction")


def test_acceptance_overlay_figure_skips_unreached_depths():
    from viz.charts import acceptance_overlay_figure

    fig = acceptance_overlay_figure({"a": ([1.0, 0.5, 0.0], [4, 2, 0]), "b<": ([0.0], [6])})
    assert [list(t.x) for t in fig.data] == [[1, 2], [1]]
    assert fig.data[1].name == "b&lt;"
    assert acceptance_overlay_figure({}).data == ()
    same = acceptance_overlay_figure({n: ([1.0, 1.0], [3, 3]) for n in "abc"})  # equal rates: all stay visible
    widths, symbols = [t.line.width for t in same.data], [t.marker.symbol for t in same.data]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(set(symbols)) == 3


# ------------------------------------------------------------------ tree layout

def random_tree_step(rng, n):
    """A verified step over a random tree of n nodes: a random accepted path, then a correction."""
    parents = [-1] + [rng.randrange(-1, i) for i in range(1, n)]
    depths = []
    for p in parents:
        depths.append(1 if p == -1 else depths[p] + 1)
    path, node = [], -1
    while True:
        kids = [i for i, p in enumerate(parents) if p == node]
        if not kids or rng.random() < 0.3:
            break
        node = rng.choice(kids)
        path.append(node)
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz <&") for _ in range(rng.randint(0, 20)))
             for _ in range(n)]
    leaf = node not in parents
    tree = DraftTree([rng.randrange(300) for _ in range(n)], parents, depths, [rng.random() for _ in range(n)])
    new = [tree.tokens[i] for i in path] + [5]
    return StepRecord(1, "draft", tree, texts, [rng.randrange(300) for _ in range(n)], ["t"] * n,
                      [rng.random() for _ in range(n)], path, 5, "bonus" if path and leaf else "correction", "w",
                      new, [texts[i] for i in path] + ["w"], 0.1, 0.1, 0.1, 0.5)


def _boxes(fig):
    return {s.name: (s.x0, s.x1, s.y0, s.y1) for s in fig.layout.shapes if s.type == "rect"}


def _cuts(seg, box, eps=0.5):
    """Whether segment ((x0, y0), (x1, y1)) passes through the inside of box (shrunk by eps)."""
    (ax, ay), (bx, by) = seg
    x0, x1, y0, y1 = box[0] + eps, box[1] - eps, box[2] + eps, box[3] - eps
    lo, hi = 0.0, 1.0
    for p, q in ((-(bx - ax), ax - x0), (bx - ax, x1 - ax), (-(by - ay), ay - y0), (by - ay, y1 - ay)):
        if p == 0:
            if q < 0:
                return False
            continue
        t = q / p
        if p < 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
    return lo < hi


@pytest.mark.parametrize("seed", range(12))
def test_tree_boxes_never_overlap_and_edges_avoid_labels(seed):
    from viz import tree_fig

    rng = random.Random(seed)
    n = rng.choice([1, 2, rng.randint(3, 64), 64])
    st = random_tree_step(rng, n)
    prev = step(0, [9], texts=["<b>"], kind="prefill")
    g = gen_of([prev, st], 1.0)
    fig = tree_fig.tree_figure(g, 1)
    boxes = _boxes(fig)
    assert len(boxes) == n + 2  # root, nodes, the target's token
    for (na, a), (nb, b) in itertools.combinations(boxes.items(), 2):
        assert not (a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]), (na, nb)
    segs = []
    for t in fig.data:
        if t.name.startswith("edges"):
            xs, ys = list(t.x), list(t.y)
            segs += [((xs[k], ys[k]), (xs[k + 1], ys[k + 1])) for k in range(0, len(xs), 3)]
    assert len(segs) == n + 1
    for seg in segs:
        assert not any(_cuts(seg, b) for b in boxes.values())
    root = fig.layout.annotations[0].text
    assert root.startswith("root") and "&lt;b&gt;" in root  # the last committed token, escaped once
    assert all("&amp;amp;" not in a.text and "&amp;lt;" not in a.text for a in fig.layout.annotations)
    x0, x1 = fig.layout.xaxis.range
    y0, y1 = fig.layout.yaxis.range
    m = fig.layout.margin
    assert fig.layout.width - m.l - m.r == x1 - x0 and fig.layout.height - m.t - m.b == y1 - y0  # 1 unit = 1 px


def test_tree_legend_names_every_status_and_first_root_is_the_prompt():
    from viz import tree_fig

    g = spec_run()
    fig = tree_fig.tree_figure(g, 0)
    legend = {t.name for t in fig.data if t.showlegend}
    assert tree_fig.STATUS_LABEL["unreached"] in legend and len(legend) == len(tree_fig.STATUS_LABEL)
    assert "the prompt" in fig.layout.annotations[0].text


def test_tree_title_when_the_text_ends_inside_the_accepted_path():
    from viz import tree_fig

    g = spec_run(eos=False)
    g.steps[1].new_tokens, g.steps[1].new_texts = [11, EOS], ["w11", "</s>"]  # 2 accepted, cut at EOS
    title = tree_fig.tree_figure(g, 1).layout.title.text
    assert "bonus" not in title and "2 committed" in title


# ------------------------------------------------------------------ benchmarks tab

def test_method_labels_in_words():
    from viz.bench import method_label

    assert method_label("engine:draft-vlm:chain:8") == "draft VLM, chain of 8"
    assert method_label("engine:vanilla") == "vanilla (one token per forward)"
    assert method_label("engine:ngram:dynamic:24,5,4") == "n-gram, dynamic tree of 24 (depth 5, top-4)"
    eager = "feature drafter EAGLE-3, chain of 4, without CUDA graphs"
    assert method_label("engine:feat-eagle3:chain:4:eager") == eager
    assert method_label("hf:assisted:draft-vlm") == "transformers assisted generation, draft VLM"
    assert method_label("hf:generate:static") == "transformers generate, static cache"
    assert method_label("engine:/srv/x/mmspec-draft-text:chain:4") == "text-only draft LM, chain of 4"
    assert ":" not in method_label("engine:feat-new:chain:4").split(", ")[0]


def test_benchmark_figures_name_hardware_and_one_question_each():
    import json
    from pathlib import Path

    from viz import bench

    d = json.loads((Path(bench.RESULTS) / "speed_h100.json").read_text())
    sp, tau = bench.speedup_figure(d["meta"], d["rows"]), bench.tau_figure(d["meta"], d["rows"])
    for fig in (sp, tau):
        assert "H100" in fig.layout.title.text and len(fig.data) == 1
        assert not any("engine:" in str(y) for y in fig.data[0].y)  # human labels only
        assert fig.layout.margin.t >= 60 and fig.layout.title.pad.t >= 30  # a band of its own, under the modebar
    assert "Speed-up" in sp.layout.title.text and "τ" in tau.layout.title.text
    assert not any(m.startswith("hf:") for m in tau.data[0].customdata)
    t0 = [r for r in d["rows"] if r["temperature"] == 0 and not r.get("error")]
    assert list(sp.data[0].customdata) == [r["method"] for r in t0]
    assert all(lo >= 0 and hi >= 0 for lo, hi in zip(sp.data[0].error_x.arrayminus, sp.data[0].error_x.array))


def test_applies_here_says_which_device():
    from viz.bench import applies_here, hardware_name

    h200 = {"hardware": "NVIDIA H200", "device": "cuda"}
    assert hardware_name(h200) == "an H200" and hardware_name({"hardware": "CPU x86_64", "device": "cpu"}) == "the CPU"
    msg = applies_here(h200, "cpu")
    assert msg.startswith("measured on an H200") and "runs on the CPU" in msg and "do not apply" in msg
    assert "comparable" in applies_here(h200, "cuda:0", "NVIDIA H200")
    assert "comparable" in applies_here({"hardware": "CPU x86_64", "device": "cpu"}, "cpu")
    assert "compare with care" in applies_here(h200, "cuda")
    assert "do not apply" in applies_here({"hardware": "CPU x86_64", "device": "cpu"}, "cuda")
    assert hardware_name({"hardware": "NVIDIA L40S"}) == "an L40S"


# ------------------------------------------------------------------ drafter cards, acceptance, the world

def dream_info(name="/srv/models/mmspec-feat-dream"):
    """What FeatureDrafter.info() returns for the shipped DREAM drafter (from its saved metadata)."""
    import json

    from mmspec.load import ASSETS

    meta = json.loads((ASSETS / "models" / "mmspec-feat-dream" / "mmspec_drafter.json").read_text())
    return {"name": name, "kind": "feature", "variant": "dream", "options": {"variant": "dream", "dream": True},
            "entropy_profile": meta["entropy_profile"], "chosen_layers": meta["chosen_layers"],
            "dream_uses_chosen_layers": True, "supervised_layer": meta["supervised_layer"],
            "target_layers": [15], "trained": True, "quality": meta["quality"], "params": meta["params"],
            "size_mb_fp16": meta["size_mb_fp16"]}


def _text(html_out):
    from html.parser import HTMLParser

    class P(HTMLParser):
        chunks: list = []

        def handle_data(self, d):
            self.chunks.append(d)

    p = P()
    p.chunks = []
    p.feed(html_out)
    return " ".join(p.chunks)


def test_feature_drafter_card_is_prose_and_tables():
    from viz import card

    info = dream_info()
    out = card.card_html(info)
    text = _text(out)
    assert "/srv" not in out and "feature drafter DREAM (mmspec-feat-dream)" in text  # last path component only
    assert not any(c in text for c in "{}[]")  # no raw JSON
    assert "Variant dream (DREAM" in text and "layers it reads: 3, 6, 15" in text and card.LAYER_RULE in text
    skipped = next(s for s in card.layer_sentences(info) if "lower entropy" in s)
    assert "9" in skipped and "11" in skipped and "first 7 of 16" in skipped  # why L9/L11 are not chosen
    held, before = info["quality"]["heldout"], info["quality"]["before_training"]  # as the shipped card says
    assert f"{info['params']:,}" in text and f"{held['acc0']:g} (untrained: {before['acc0']:g})" in text
    assert out.count("<table") == 3


def test_layer_note_says_which_layers_each_drafter_reads():
    from viz import card

    profile = [0.7, 0.6, 0.5, 0.4, 0.6, 0.7, 0.5, 0.6]
    dream = card.layer_choice_html(profile, {"name": "/m/mmspec-feat-dream", "chosen_layers": [2, 3, 7]})
    aasd = card.layer_choice_html(profile, {"name": "/m/mmspec-feat-aasd", "chosen_layers": [2, 3, 7],
                                            "dream_uses_chosen_layers": False, "target_layers": [0, 8]})
    vlm = card.layer_choice_html(profile, {"name": "/m/mmspec-draft-vlm", "kind": "model"})
    assert "reads layers 2, 3, 7." in _text(dream)
    assert "this drafter reads layers 0, 8 instead" in _text(aasd) and "does not read" not in _text(aasd)
    assert "this drafter does not read target layers" in _text(vlm)
    assert "no drafter ran" in _text(card.layer_choice_html(profile))


def test_cards_of_other_drafters_and_escaping_once():
    from viz import card

    for info, want in (({"name": "ngram", "kind": "ngram", "max_n": 3, "min_n": 1}, "1 to 3 tokens"),
                       ({"name": "/a/b/mmspec-draft-text", "kind": "model", "sees_image": False},
                        "never sees the image"),
                       ({"name": "random", "kind": "random"}, "τ = 1.00"),
                       ({"name": "/x/head", "kind": "eagle3", "target_layers": [1, 7, 13], "aux_layers_from": "config",
                         "engines_would_read": {"vLLM": [2, 8, 14]}, "params": 10}, "vLLM would read layers")):
        out = card.card_html(info)
        assert want in _text(out) and "/a/" not in out and "/x/" not in out
    evil = card.card_html({"name": "<x>&", "kind": "<k>", "odd_key": "<v>"})
    assert "&lt;x&gt;&amp;" in evil and "&lt;v&gt;" in evil and "<x>" not in evil and "&amp;lt;" not in evil
    assert "Vanilla" in card.card_html({})
    assert card.plain({"a": [1, 2.123456], "b": None, "c": True}) == "a 1, 2.123; b –; c yes"


def test_acceptance_summary_for_any_drafter():
    from viz import card

    g = spec_run()
    g.steps[1].new_texts = ["red", "w", " circle"]  # accepted, accepted, bonus
    g.steps[2].new_texts = ["Top", "x"]  # accepted, correction
    s = card.acceptance_summary(g, window=4)
    # visual: red, circle, Top; other: w, x (the prefill token and the end-of-text token do not count)
    assert s["visual"][:2] == (2, 3) and s["other"][:2] == (1, 2)
    assert [(a, n) for _, a, n, _ in s["by_position"]] == [(2, 4), (1, 2)]  # prefill token counts as position 1
    assert s["by_depth"] == list(zip(g.stats.acceptance_by_depth, g.stats.drafted_by_depth))
    out = card.acceptance_html(g, window=4)
    assert "67% accepted drafts (2 of 3)" in out and "tokens 1–4" in out
    assert "needs a speculative run" in card.acceptance_html(vanilla_run())


def test_world_scope_in_and_out():
    from mmspec.world import QA_KINDS, make_qa, sample_scene
    from viz import card

    rng = random.Random(0)
    for _ in range(40):  # every question the world asks, re-sampled: the template vocabulary is covered
        scene = sample_scene(rng)
        for kind in QA_KINDS:
            prompt = make_qa(scene, rng, kind).prompt
            assert card.world_scope(prompt).inside, prompt
    for prompt in ("What is the capital of France?", "Write a poem about the sea.", "Is this a cat?",
                   "What colour is the house?", "", "What is it?"):
        scope = card.world_scope(prompt)
        assert not scope.inside and "\n" not in scope.reason, prompt
    assert "capital, france" in card.world_scope("What is the capital of France?").reason
    assert card.world_scope("Where is the big red star?").inside


def test_world_scope_pictures():
    from PIL import Image

    from mmspec.world import sample_example
    from viz import card

    scene = sample_example(5)[0]
    assert card.world_scope("Describe the image.", card.image_stats_of(scene)).inside
    rng = random.Random(1)
    photo = Image.new("RGB", (320, 240))
    photo.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(320 * 240)])
    out = card.world_scope("Describe the image.", card.image_stats_of(photo))
    assert not out.inside and "distinct colours" in out.reason
    assert not card.world_scope("Describe the image.", {"size": (1000, 200)}).inside


# ------------------------------------------------------------------ on the engine's own traces (tiny model)

@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    import tiny_models
    from mmspec import load_target

    path = tiny_models.build_llava(tmp_path_factory.mktemp("stage") / "llava", seed=0)
    return load_target(str(path)), tiny_models.image(0)


def test_protocol_and_race_on_real_decodes(tiny_target):
    """measure() around generate(): greedy repeats agree, tau conventions match Stats; the race of
    vanilla + 3 drafters ends with every run's committed tokens, EOS as a marker only."""
    from mmspec import DecodeConfig, generate, load_drafter

    target, img = tiny_target
    runs = {}
    for name, drafter, tree in (("vanilla", None, "chain:4"), ("random", "random", "chain:4"),
                                ("ngram", "ngram", "chain:4"), ("self", target.name, "dynamic:8,3,2")):
        d = load_drafter(drafter, target)
        cfg = DecodeConfig(max_new_tokens=16, tree=tree)
        runs[name] = measure.measure(name, lambda d=d, cfg=cfg: generate(target, d, img, "Describe the image.", cfg))
    for m in runs.values():
        assert m.repeatable is True and m.tokens_per_s.n == 3 and m.device == str(target.device)
        assert m.tau == pytest.approx(m.runs[0].stats.tau)
        assert m.accepted_per_step == pytest.approx(m.runs[0].stats.mean_accepted)
    assert runs["vanilla"].tau == pytest.approx(1.0) and runs["random"].tau < 1.2
    r = race.race([(k, m.representative) for k, m in runs.items()], fps=4)
    eos = target.eos_ids
    for pane, (name, m) in zip(r.frames[-1].panes, runs.items()):
        g = m.representative
        drawn = [t for t in pane.tokens if t.fate != "end"]
        assert len(drawn) == len(g.token_ids) - (g.token_ids[-1] in eos)
        assert pane.ended == (g.token_ids[-1] in eos)
        assert race.race_tokens(g) == race.race_tokens(g, eos)  # the length rule agrees with the real EOS ids


def test_result_sets_and_spread_figure(tmp_path):
    from viz import bench, charts
    from viz.charts import speedup_spread_figure

    names = [s.name for s in bench.result_sets()]
    assert "speed_h100" in names and names[-1] == "speed_cpu"  # GPU measurements first
    (tmp_path / "speed_bad.json").write_text("{oops")
    (tmp_path / "speed_empty.json").write_text('{"meta": {}, "rows": []}')
    assert bench.result_sets(tmp_path) == []
    van = measure.summarise("vanilla", [vanilla_run(wall=w) for w in (2.0, 2.2, 2.6)])
    ms = [measure.summarise(n, [spec_run(wall=w) for w in ws]) for n, ws in
          (("ngram", (1.8, 2.0, 2.4)), ("draft <VLM>", (0.9, 1.0, 1.1)))]
    pts = measure.speedup_points(measure.compare_all(van, ms))
    fig = speedup_spread_figure(pts)
    assert list(fig.data[0].customdata) == ["within noise", "faster"]
    assert list(fig.data[0].y) == ["ngram", "draft &lt;VLM&gt;"] and "cpu, float32" in fig.layout.title.text
    lo, hi = fig.data[0].error_x.arrayminus, fig.data[0].error_x.array
    assert all(a >= 0 and b >= 0 for a, b in zip(lo, hi))
    assert list(fig.data[0].textposition) == charts._inward(pts)
    edge = [dict(lo=0.8, speedup=0.97, hi=1.1), dict(lo=2.0, speedup=2.5, hi=3.0), dict(lo=3.5, speedup=4.9, hi=5.0)]
    assert charts._inward(edge) == ["top right", "top center", "top left"]  # labels lean inward, not off the edge
    assert [label for label, _ in measure.race_inputs(van, ms)] == ["vanilla", "ngram", "draft <VLM>"]
    assert measure.race_inputs(van, ms, label=str.upper)[1][0] == "NGRAM"


def test_measure_all_runs_in_rounds_after_every_warmup():
    calls = []

    def decode(name, make):
        def run():
            calls.append(name)
            return make(1.0)
        return run

    seen = []
    out = measure.measure_all({"vanilla": decode("v", lambda w: vanilla_run(wall=w)),
                               "ngram": decode("n", spec_run)}, on_run=lambda name, i, g: seen.append((name, i)))
    assert calls == ["v", "n"] + ["v", "n"] * 3  # warm-ups first, then rounds
    assert seen[:3] == [("vanilla", 1), ("ngram", 1), ("vanilla", 2)]
    assert [m.tokens_per_s.n for m in out.values()] == [3, 3] and out["ngram"].method == "ngram"
    with pytest.raises(ValueError):
        measure.measure_all({"v": decode("v", spec_run)}, repeats=1)


def test_last_part_hides_directories_only():
    from viz.card import last_part

    assert last_part("/srv/app/assets/models/mmspec-feat-dream/") == "mmspec-feat-dream"
    assert last_part("/home/a user/my drafter") == "my drafter"
    assert last_part("assets/models/mmspec-draft-vlm") == "mmspec-draft-vlm"
    assert last_part("C:\\\\models\\\\head") == "head" and last_part("~/m/x") == "x"
    assert last_part("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"  # a hub id, not a path
    assert last_part("read from config (vLLM/SGLang)") == "read from config (vLLM/SGLang)"


def test_as_json_carries_spreads_and_verdict():
    import json

    van = measure.summarise("vanilla", [vanilla_run(wall=w) for w in (2.0, 2.2, 2.6)])
    rnd = measure.summarise("random", [random_drafter_run(w) for w in (2.1, 2.3, 2.5)])
    out = json.loads(json.dumps(measure.as_json(rnd, measure.compare(rnd, van))))
    assert out["tokens_per_s"]["n"] == 3 and out["tokens_per_s"]["min"] <= out["tokens_per_s"]["median"]
    assert out["wall_s"] == {"median": 2.3, "min": 2.1, "max": 2.5, "p10": pytest.approx(2.14),
                             "p90": pytest.approx(2.46), "n": 3}
    assert out["tau"] == 1.0 and out["accepted_per_step"] == 0.0 and out["device"] == "cpu"
    assert out["speedup"]["verdict"] == "within noise" and out["speedup"]["min"] < 1 < out["speedup"]["max"]
    assert "speedup" not in measure.as_json(van)
