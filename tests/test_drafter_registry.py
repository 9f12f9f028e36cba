"""The drafters registry (mmspec.drafters.registry): every row recognises its shipped instances, an
unknown spec is refused with one InputError line (by the CLI before the target loads), and the
CLI's help, bench/speed.py's defaults and the app's drafter menu and model-free names come from it.
Cheap: no model is loaded (a row is recognised from its files)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import mmspec.load
from mmspec import InputError, load_drafter
from mmspec.cli import build_parser, main
from mmspec.drafters import registry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def test_every_row_recognises_its_shipped_instances():
    shipped = {k.kind: k.shipped(registry.SHIPPED) for k in registry.KINDS}
    assert all(shipped.values()), shipped  # this repository ships at least one of each kind
    for kind in registry.KINDS:
        for label, spec in shipped[kind.kind]:
            assert label and registry.find(spec) is kind, (label, spec)
    assert [k.kind for k in registry.KINDS].count("model") == 1 and registry.KINDS[-1].kind == "model"  # the catch-all
    assert len({k.kind for k in registry.KINDS}) == len(registry.KINDS)
    for name in (None, "", "vanilla", "none"):
        assert registry.find(name) is None and load_drafter(name, None) is None


def test_keywords_make_their_drafters(tiny_dir):
    from mmspec import load_target

    target = load_target(str(tiny_dir / "llava"), "cpu", "float32")
    for word in registry.model_free_names():
        assert load_drafter(word, target).kind == registry.find(word).kind == word


@pytest.mark.parametrize("spec", ["medusa", "NGRAM", "eagle", "vanilla2"])
def test_unknown_names_are_refused_in_one_line(spec, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no directory of that name in the way
    for call in (lambda: registry.find(spec), lambda: load_drafter(spec, None)):
        with pytest.raises(InputError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"unknown drafter {spec!r}: use vanilla") and "\n" not in msg
        assert all(k.label in msg for k in registry.KINDS)

    def never(*a, **k):
        raise AssertionError("the target was loaded for an unknown drafter")

    monkeypatch.setattr(mmspec.load, "load_target", never)
    assert main(["generate", "--drafter", spec, "--prompt", "hi", "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: unknown drafter {spec!r}") and len(err.splitlines()) == 1


def test_cli_help_lists_the_registry():
    gen = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    text = next(a for a in gen._actions if a.dest == "drafter").help
    assert text.startswith(registry.help_text())
    for k in registry.KINDS:
        assert k.label in text and (k.keyword is None or k.keyword in text)


def test_bench_defaults_come_from_the_registry():
    spec = importlib.util.spec_from_file_location("bench_speed_defaults", ROOT / "bench" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    assert speed.DEFAULT_DRAFTERS == registry.benchmarked(registry.SHIPPED)
    every = [s for _, s in registry.choices(registry.SHIPPED)]
    assert set(speed.DEFAULT_DRAFTERS) == set(every) - {"random"}  # random is the only one not timed


def test_app_menu_and_model_free_names_match_the_registry(monkeypatch):
    """The app's menu and the web UI's model-free names come from the registry (MMSPEC_DRAFTERS and a
    configured list included)."""
    import app
    from webui import policy, session

    monkeypatch.delenv("MMSPEC_DRAFTERS", raising=False)
    menu = registry.choices(app.MODELS_DIR)
    assert app._drafter_list(None) == menu
    assert [s for _, s in menu[-2:]] == ["ngram", "random"] and len(menu) == len({s for _, s in menu})
    monkeypatch.setenv("MMSPEC_DRAFTERS", "org/some-drafter, random")
    assert app._drafter_list(None) == registry.choices(app.MODELS_DIR, [("org/some-drafter", "org/some-drafter"),
                                                                         ("random", "random")])
    given = ["x/y", ("n-gram here", "ngram")]
    assert app._drafter_list(given) == registry.choices(None, [("x/y", "x/y"), ("n-gram here", "ngram")])
    assert policy.ALWAYS_DRAFTERS == registry.model_free_names()
    for name in ("ngram", "random", "vanilla", "medusa", str(app.MODELS_DIR / "mmspec-draft-vlm")):
        assert registry.is_model_free(name) == (name in ("ngram", "random", "vanilla")), name


def test_decoding_never_imports_the_world_or_the_trainers():
    code = ("import sys, mmspec, mmspec.cli, mmspec.drafters.registry, mmspec.drafters.feature.files; "
            "print(sorted(m for m in sys.modules if m.startswith(('mmspec.world', 'mmspec.train'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
