"""webui/ without Gradio: which files a request may name, public-mode policy, bounded bookkeeping."""
from __future__ import annotations

import pytest

from mmspec import InputError
from webui.policy import Limits, Policy, make_policy, parse_pairs, public_mode
from webui.request import FILE_DATA, Rules, parse_request, uploaded_file
from webui.session import ModelCache, RateLimiter, RunRegistry, SessionFiles, model_key

META = {"_type": FILE_DATA}


@pytest.fixture()
def dirs(tmp_path):
    upload = tmp_path / "gradio"
    upload.mkdir()
    (upload / "img.png").write_bytes(b"x")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    (upload / "link.png").symlink_to(outside)
    return upload, outside


def test_only_uploads_and_examples_are_read(dirs):
    upload, outside = dirs
    ok = str(upload / "img.png")
    assert uploaded_file({"path": ok, "meta": META}, str(upload)) == ok
    assert uploaded_file(None, str(upload)) is None
    assert uploaded_file({"path": str(outside)}, str(upload), examples={str(outside)}) == str(outside)
    refused = ["/etc/passwd", {"path": "/etc/passwd"}, {"path": "/etc/passwd", "meta": META},
               {"path": ok}, {"path": ok, "meta": {"_type": "other"}},  # no FileData marker
               {"path": str(upload / "link.png"), "meta": META},  # a link out of the upload folder
               {"path": str(upload / ".." / "secret.png"), "meta": META}, {"path": 3, "meta": META}, ["x"]]
    for payload in refused:
        with pytest.raises(InputError, match="upload"):
            uploaded_file(payload, str(upload))


def rules(public: bool, upload: str) -> Rules:
    policy = make_policy(public, "/models/target", ["/models/draft", "ngram"], env={"MMSPEC_PUBLIC_PAIRS": "hub/t=hub/d"})
    return Rules(Limits.public() if public else Limits(), policy, upload, frozenset())


ARGS = dict(shape="chain", chain_len=4, budget=8, depth=3, topk=2, temperature=0.0, top_p=1.0, seed=0, max_tokens=8)


def test_public_policy_refuses_typed_models(dirs):
    upload, _ = dirs
    r = rules(True, str(upload))
    img = {"path": str(upload / "img.png"), "meta": META}
    for target, drafter in [("/models/other", "ngram"), ("someone/any-model", "ngram"), ("/models/target", "/tmp/d"),
                            ("/models/target", "someone/draft"), ("/models/target", "hub/d"), ("hub/t", "/models/draft")]:
        with pytest.raises(InputError, match="public app runs only"):
            parse_request(r, img, "hi", target, drafter, **ARGS)
    with pytest.raises(InputError, match="between 1 and 256"):
        parse_request(r, img, "hi", "/models/target", "ngram", **{**ARGS, "max_tokens": 10_000})
    with pytest.raises(InputError, match="too long"):
        parse_request(r, img, "x" * 501, "/models/target", "ngram", **ARGS)
    # the listed pairs pass the policy (then fail on the fake image, which is not a picture)
    for target, drafter in [("/models/target", "/models/draft"), ("/models/target", "random"), ("hub/t", "hub/d")]:
        with pytest.raises(InputError, match="not a readable image"):
            parse_request(r, img, "hi", target, drafter, **ARGS)
    open_rules = rules(False, str(upload))  # not public: any model may be named
    with pytest.raises(InputError, match="not a readable image"):
        parse_request(open_rules, img, "hi", "someone/any-model", "/tmp/d", **ARGS)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", float("nan"), "temperature"), ("max_tokens", float("inf"), "numbers"),
    ("seed", 2**64, "seed"), ("seed", -1, "seed"), ("top_p", float("nan"), "top-p"),
    ("chain_len", float("inf"), "whole numbers"),
])
def test_bad_numbers(dirs, field, value, message):
    upload, _ = dirs
    img = {"path": str(upload / "img.png"), "meta": META}
    with pytest.raises(InputError, match=message):
        parse_request(rules(False, str(upload)), img, "hi", "t", "ngram", **{**ARGS, field: value})


def test_public_mode_from_env():
    assert public_mode({"SPACE_ID": "user/space"}) and public_mode({"MMSPEC_PUBLIC": "1"})
    assert not public_mode({}) and not public_mode({"MMSPEC_PUBLIC": "0"})
    assert parse_pairs("a=b|c; d=") == {"a": ("b", "c"), "d": ()}
    p = Policy(True, {"t": ("d",)})
    assert p.targets == ["t"] and p.drafters() == ["d", "ngram", "random"]


def test_stop_table_does_not_grow_from_fresh_session_ids():
    runs = RunRegistry()
    for i in range(5000):
        assert not runs.stop(f"visitor-{i}")
    assert len(runs) == 0
    with runs.running("s") as event:
        assert len(runs) == 1 and runs.stop("s") and event.is_set() and runs.event("s") is event
    assert len(runs) == 0 and not runs.event("s").is_set()


def test_rate_limiter():
    lim = RateLimiter(per_minute=3, max_sessions=10)
    with lim.slot("a") as ok, lim.slot("a") as again:
        assert ok and not again  # one at a time per session
    for _ in range(2):
        with lim.slot("a") as ok:
            assert ok
    with lim.slot("a") as ok:
        assert not ok  # the fourth in a minute
    with lim.slot("b") as ok:
        assert ok  # other sessions unaffected
    for i in range(1000):
        with lim.slot(f"s{i}"):
            pass
    assert len(lim.seen) == 10


def test_session_files(tmp_path):
    files = SessionFiles(keep=1, max_sessions=2)
    paths = [tmp_path / f"{i}.json" for i in range(5)]
    for p in paths:
        p.write_text("{}")
    files.add("a", paths[0])
    files.add("a", paths[1])
    assert not paths[0].exists() and paths[1].exists()  # only the latest is kept
    files.add("b", paths[2])
    files.add("c", paths[3])  # evicts a (the oldest)
    assert not paths[1].exists()
    files.release("b")
    assert not paths[2].exists() and paths[3].exists()


def test_one_cache_entry_per_model_directory(tiny_dir, tmp_path):
    draft = tiny_dir / "llava-draft"
    (tmp_path / "alias").symlink_to(draft)
    aliases = [str(draft), str(draft) + "/", str(draft / ".." / "llava-draft"), str(tmp_path / "alias")]
    assert len({model_key(a) for a in aliases}) == 1
    cache = ModelCache(max_targets=1, max_drafters=2)
    target = cache.target(str(tiny_dir / "llava"))
    assert cache.target(str(tiny_dir / "llava") + "/") is target
    drafters = {id(cache.drafter(a, target)) for a in aliases}
    assert len(drafters) == 1 and len(cache.drafters) == 1
    cache.drafter(str(tiny_dir / "text-draft"), target)
    cache.drafter(str(tiny_dir / "llava"), target)
    cache.drafter(str(tiny_dir / "llava-peaky-draft"), target)
    assert len(cache.drafters) == 2  # bounded: least recently used dropped
    assert cache.drafter("ngram", target) is not cache.drafter("ngram", target)  # model-free: made fresh


def test_image_limits(dirs):
    """Pixels are counted from the header, before decoding; bytes from the file size."""
    from PIL import Image

    upload, _ = dirs
    big = upload / "big.png"
    Image.new("L", (5000, 4000)).save(big)  # 20 MP, a few KB on disk
    img = {"path": str(big), "meta": META}
    with pytest.raises(InputError, match="megapixels"):
        parse_request(rules(True, str(upload)), img, "hi", "/models/target", "ngram", **ARGS)
    heavy = upload / "heavy.png"
    heavy.write_bytes(b"\0" * (9 * 2**20))
    with pytest.raises(InputError, match="the limit is 8 MB"):
        parse_request(rules(True, str(upload)), {"path": str(heavy), "meta": META}, "hi", "/models/target", "ngram",
                      **ARGS)


def test_trace_settings_are_clamped_and_public_drafters_checked():
    """A replayed trace fills the controls; its numbers are a visitor's and are clamped to each
    control's range, a shape the controls cannot show is left out, public mode keeps listed drafters."""
    from webui.request import trace_settings

    cfg = {"tree": "dynamic:300,20,3", "temperature": "hot", "top_p": 7, "seed": -5, "max_new_tokens": 10**9}
    out = trace_settings(cfg, "Where is the <b>?", ["/x/draft", "ngram", "evil/hub"], 64, allowed={"ngram"})
    assert out == {"prompt": "Where is the <b>?", "temperature": 0.0, "top_p": 1.0, "seed": 0, "max_tokens": 64,
                   "drafter": "ngram", "rivals": [], "shape": "tree (dynamic)", "budget": 128, "depth": 12, "topk": 3}
    chain = trace_settings({"tree": "chain:4", "temperature": 0.7}, "p", ["a", "b"], 64)
    assert (chain["shape"], chain["chain_len"], chain["drafter"], chain["rivals"], chain["temperature"]) == (
        "chain", 4, "a", ["b"], 0.7)
    assert "shape" not in trace_settings({"tree": "static:[[0]]"}, "p", [], 64)


def test_views_fill_every_declared_output_by_name(tiny_dir):
    """webui.views builds the page's values without Gradio: after a run every race and view output the
    app declares gets a value (no output left stale), unused race panes are hidden, and a run without a
    visual map hides that plot rather than keeping the previous one."""
    import app
    import crafted
    from viz import traceio
    from webui import views

    data = crafted.real_race(tiny_dir)
    bundle = traceio.unpack(data)
    out = views.everything(bundle, views.Pace(fps=4, min_s=1, max_s=2), [], "trace.json")
    assert set(out) == set(app.RACE_OUT) | set(app.VIEW_OUT)
    assert [out[f"pane{i}"].props["visible"] for i in range(4)] == [True, True, False, False]
    assert out["vmap_plot"].props["visible"] is True  # the crafted run has a visual map
    for step in data["speculative"]["steps"]:
        step["extras"] = {}
    plain = views.everything(traceio.unpack(data), views.Pace(fps=4, min_s=1, max_s=2), [], None)
    assert plain["vmap_plot"].props == {"value": None, "visible": False}
    assert views.SKIP.props == {} and views.short_name("/srv/models/draft-vlm") == "draft-vlm"


def test_rivals_and_repeats_are_checked_before_any_work(dirs):
    """Up to 2 more drafters (duplicates and the main one dropped, vanilla refused, the public list
    enforced for each) and 3-10 timed runs; all refused before the image is opened."""
    upload, _ = dirs
    img = {"path": str(upload / "img.png"), "meta": META}
    public, open_rules = rules(True, str(upload)), rules(False, str(upload))
    cases = [(open_rules, ["a", "b", "c"], 3, "at most 3 drafters"), (open_rules, ["vanilla"], 3, "baseline"),
             (open_rules, ["random"], 2, "between 3 and 10"), (open_rules, [3], 3, "list of names"),
             (open_rules, [], "many", "whole number"), (public, ["someone/draft"], 3, "public app runs only")]
    for r, rivals, repeats, message in cases:
        with pytest.raises(InputError, match=message):
            parse_request(r, img, "hi", "/models/target", "ngram", **ARGS, rivals=rivals, repeats=repeats)
    # accepted settings go on to open the image (a fake one here)
    with pytest.raises(InputError, match="not a readable image"):
        parse_request(public, img, "hi", "/models/target", "ngram", **ARGS, rivals=["random", "ngram", "random"],
                      repeats=5)
    from webui.request import rivals_of

    assert rivals_of("ngram", ["random", " ngram", "random", ""], "4") == (("random",), 4)


def test_scope_warning_for_questions_and_photos(tmp_path):
    """The out-of-world warning: a question the synthetic world never asks, a photo-like picture; a
    question of the world about a rendered scene gets none."""
    from PIL import Image

    import tiny_models
    from mmspec.world import sample_example
    from webui import views

    photo = tmp_path / "photo.png"
    tiny_models.image(1, size=224).save(photo)  # noise: thousands of colours
    scene = tmp_path / "scene.png"
    sample_example(3)[0].save(scene)
    assert "capital" in views.scope_html("What is the capital of France?", None, Limits())
    assert "distinct colours" in views.scope_html("How many red circles are there?", str(photo), Limits())
    assert views.scope_html("How many red circles are there?", str(scene), Limits()) == ""
    Image.new("RGB", (4000, 4000)).save(big := tmp_path / "big.png")
    assert views.scope_html("Describe the image.", str(big), Limits(max_image_pixels=1000)) == ""  # not opened


def test_stop_reaches_every_run_of_the_session():
    """A replay started while a measurement runs (same session) must not hide the measurement from Stop."""
    runs = RunRegistry()
    with runs.running("s") as measuring:
        with runs.running("s") as replaying:
            assert len(runs) == 1 and runs.event("s") is replaying
        assert runs.event("s") is measuring  # the replay ended: the measurement is still registered
        with runs.running("other") as elsewhere:
            assert runs.stop("s") and measuring.is_set() and not elsewhere.is_set()
    assert len(runs) == 0 and not runs.stop("s")


def test_legend_counts_leave_the_end_of_text_out(tiny_dir):
    """The legend's counts are of content: an end-of-text token is drawn as a marker and counted nowhere."""
    import crafted
    from viz import race, traceio
    from webui import views

    bundle = traceio.unpack(crafted.real_race(tiny_dir))
    spec = bundle.speculative
    next(s for s in reversed(spec.steps) if s.new_tokens).new_texts[-1] = "</s>"  # the answer ends on EOS
    assert race.ends_with_eos(spec, None)
    counts = views.fate_counts(spec, views.vocab_of(bundle))
    committed = sum(counts[f] for f in ("accepted", "correction", "bonus", "target"))
    assert committed == len(spec.token_ids) - 1
