"""The default method: what bench/speed.py measured fastest, read back by the CLI (and the app)."""
import json

from mmspec import cli
from mmspec.defaults import FALLBACK, MODELS, default_method, pick_fastest


def _row(method, temp, speedup, lossless=True, error=None):
    return {"method": method, "temperature": temp, "speedup": speedup, "lossless": lossless, "error": error, "tau": 3.0}


def test_pick_fastest_takes_the_best_lossless_engine_method_at_t0():
    rows = [_row("engine:vanilla", 0, 1.0), _row("engine:draft-vlm:chain:8", 0, 3.1),
            _row("engine:feat-eagle3:dynamic:24,5,4", 0, 3.4), _row("engine:feat-eagle3:dynamic:24,5,4", 1, 3.0),
            _row("engine:feat-dream:chain:4", 0, 9.0, lossless=False),  # not equal to vanilla: never the default
            _row("engine:draft-vlm:chain:8:eager", 0, 5.0), _row("hf:assisted:draft-vlm", 0, 8.0),
            _row("engine:ngram:chain:4", 0, 7.0, error="boom")]
    best = pick_fastest(rows, {"hardware": "NVIDIA H200", "dtype": "bfloat16", "n": 8})
    assert (best["drafter"], best["tree"]) == ("feat-eagle3", "dynamic:24,5,4")
    assert best["measured"]["speedup_t0"] == 3.4 and best["measured"]["speedup_t1"] == 3.0
    assert pick_fastest([_row("engine:vanilla", 0, 1.0)], {}) is None


def test_default_method_reads_only_shipped_drafters(tmp_path):
    f = tmp_path / "default.json"
    assert (default_method(f).drafter, default_method(f).tree) == FALLBACK  # no file
    shipped = sorted(p.name for p in MODELS.iterdir() if p.is_dir())[0]
    f.write_text(json.dumps({"drafter": shipped, "tree": "dynamic:24,5,4"}))
    assert default_method(f).drafter == str(MODELS / shipped) and default_method(f).tree == "dynamic:24,5,4"
    f.write_text(json.dumps({"drafter": shipped.removeprefix("mmspec-"), "tree": "chain:8"}))  # bench's short name
    assert default_method(f).drafter == str(MODELS / shipped)
    f.write_text(json.dumps({"drafter": "/etc/../etc/passwd", "tree": "chain:2"}))  # never a path from the file
    assert (default_method(f).drafter, default_method(f).tree) == FALLBACK
    f.write_text(json.dumps({"drafter": "ngram", "tree": "chain:6"}))
    assert (default_method(f).drafter, default_method(f).tree) == ("ngram", "chain:6")
    f.write_text("not json")
    assert (default_method(f).drafter, default_method(f).tree) == FALLBACK


def test_cli_without_drafter_uses_the_recorded_default(monkeypatch):
    monkeypatch.setattr("mmspec.defaults.default_method", lambda: __import__("mmspec.defaults").defaults.DefaultMethod(
        "ngram", "dynamic:8,3,2"))
    args = cli.build_parser().parse_args(["generate", "--prompt", "x"])
    cli._with_defaults(args)
    assert (args.drafter, args.tree) == ("ngram", "dynamic:8,3,2")
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--tree", "chain:2"])
    cli._with_defaults(args)
    assert (args.drafter, args.tree) == ("ngram", "chain:2")
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--drafter", "random"])
    cli._with_defaults(args)
    assert (args.drafter, args.tree) == ("random", "chain:4")
    # The recorded default was measured for the embedded target: another target gets n-gram.
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--target", "some/dir"])
    cli._with_defaults(args)
    assert (args.drafter, args.tree) == FALLBACK


def test_app_starts_at_the_measured_default(monkeypatch, tmp_path):
    import app
    from mmspec.defaults import DefaultMethod

    vlm = str(MODELS / "mmspec-draft-vlm")
    monkeypatch.setattr(app, "default_method", lambda: DefaultMethod(vlm, "dynamic:24,5,4"))
    cfg = app.make_config(cache_examples=False)
    assert cfg.default_drafter == vlm and cfg.default_tree.describe() == "dynamic:24,5,4"
    cfg = app.make_config(default_drafter="ngram", cache_examples=False)  # an explicit choice wins
    assert cfg.default_drafter == "ngram" and cfg.default_tree.describe() == "chain:4"
    monkeypatch.setattr(app, "default_method", lambda: DefaultMethod("/not/offered", "chain:8"))
    assert app.make_config(cache_examples=False).default_tree.describe() == "chain:4"


def test_the_app_controls_can_show_the_shipped_default(monkeypatch):
    """The shipped record starts the app at its own shape, and the request check accepts that shape;
    a record beyond the sliders' range starts the drafter at chain:4 instead of an unrunnable setting."""
    import app
    from mmspec.defaults import DefaultMethod
    from webui.request import tree_spec

    shipped = default_method()
    cfg = app.make_config(cache_examples=False)
    assert cfg.default_tree.describe() == shipped.tree
    t = cfg.default_tree
    chain = t.kind == "chain"
    assert tree_spec("chain" if chain else "tree (dynamic)", t.depth, t.budget, t.depth, t.topk) == shipped.tree
    monkeypatch.setattr(app, "default_method", lambda: DefaultMethod(shipped.drafter, "chain:40"))
    cfg = app.make_config(cache_examples=False)
    assert cfg.default_drafter == shipped.drafter and cfg.default_tree.describe() == "chain:4"
