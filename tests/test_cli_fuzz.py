"""The CLI refuses bad input with exit code 2 and exactly one `error:` line on stderr, never a
traceback, and soon: numbers, tree specs, images, model and drafter directories, devices, paths.

Most cases call `mmspec.cli.main` in-process (a model load costs well under a second there); a few
go through a real `python -m mmspec` to prove the exit code and the one stderr line end to end.
Cases that can be refused from the arguments alone must be refused before the target is loaded:
that is checked by counting calls to `load_target`, not by timing. Each case also gets a generous
wall-clock bound (a hang such as the 40,200-node tree used to cause fails it; a busy machine does not).
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

import mmspec.load
from mmspec.cli import main
from tiny_models import image

ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 60.0  # "a few seconds" on an idle machine; generous so that a loaded CI box still passes

# Refused from the arguments (and files they name) alone: the target must never be loaded.
# {d} is this module's scratch directory, {t} the tiny models' directory.
BEFORE_LOAD = {
    "temperature-nan": ["--temperature", "nan"],
    "temperature-inf": ["--temperature", "inf"],
    "temperature-minus-inf": ["--temperature=-inf"],
    "temperature-1e-300": ["--temperature", "1e-300"],
    "temperature-negative": ["--temperature", "-1"],
    "temperature-huge": ["--temperature", "1e6"],
    "temperature-text": ["--temperature", "warm"],
    "top-p-1e-300": ["--temperature", "1", "--top-p", "1e-300"],
    "top-p-nan": ["--temperature", "1", "--top-p", "nan"],
    "top-p-zero": ["--temperature", "1", "--top-p", "0"],
    "top-p-above-1": ["--temperature", "1", "--top-p", "1.5"],
    "seed-2**64": ["--seed", str(2**64)],
    "seed-2**63": ["--seed", str(2**63)],
    "seed-below-int64": ["--seed", str(-(2**63) - 1)],
    "seed-negative": ["--seed", "-1"],
    "seed-float": ["--seed", "1.5"],
    "max-new-tokens-0": ["--max-new-tokens", "0"],
    "max-new-tokens-negative": ["--max-new-tokens", "-1"],
    "max-new-tokens-huge": ["--max-new-tokens", str(10**30)],
    "max-new-tokens-float": ["--max-new-tokens", "1e9"],
    "chain-0": ["--tree", "chain:0"],
    "chain-huge": ["--tree", "chain:100000"],
    "dynamic-budget-over-limit": ["--tree", "dynamic:513,4,4"],
    "dynamic-budget-huge": ["--tree", "dynamic:100000000,5,4"],
    "dynamic-depth-over-limit": ["--tree", "dynamic:8,33,4"],
    "dynamic-two-numbers": ["--tree", "dynamic:1,2"],
    "unknown-tree-kind": ["--tree", "tree:3"],
    "static-infinity": ["--tree", "static:[[Infinity]]"],
    "static-1e400": ["--tree", "static:[[1e400]]"],
    "static-huge-rank": ["--tree", "static:[[" + "9" * 40 + "]]"],
    "static-string-rank": ["--tree", 'static:[["0"]]'],
    "static-33-deep-path": ["--tree", "static:" + json.dumps([[0] * k for k in range(1, 34)])],
    "static-40200-nodes": ["--tree", "static:{d}/big-tree.json"],
    "static-4096-nodes": ["--tree", "static:{d}/wide-tree.json"],
    "static-nested-100000-deep": ["--tree", "static:{d}/nested-tree.json"],
    "static-path-100000-long": ["--tree", "static:{d}/long-path-tree.json"],
    "static-oversize-file": ["--tree", "static:{d}/oversize-tree.json"],
    "static-dev-zero": ["--tree", "static:/dev/zero"],
    "static-missing-file": ["--tree", "static:{d}/no-such-tree.json"],
    "device-bogus": ["--device", "bogus"],
    "device-cuda-99": ["--device", "cuda:99"],
    "device-empty": ["--device", ""],
    "dtype-bogus": ["--dtype", "float8"],
    "max-memory-without-device-map": ["--max-memory", "0=1GiB"],
    "max-memory-bad-size": ["--device-map", "auto", "--max-memory", "0=lots"],
    "max-memory-no-size": ["--device-map", "auto", "--max-memory", "0=1GiB,cpu"],
    "device-map-bogus": ["--device-map", "everywhere"],
    "fast-path-unknown": ["--fast-path", "sometimes"],
    "unknown-option": ["--turbo"],
    "prompt-empty": ["--prompt", ""],
    "prompt-whitespace": ["--prompt", "  \n\t "],
    "image-missing": ["--image", "{d}/missing.png"],
    "image-directory": ["--image", "{d}"],
    "image-text-file": ["--image", "{d}/text.png"],
    "image-empty-file": ["--image", "{d}/empty.png"],
    "image-truncated": ["--image", "{d}/truncated.png"],
    "image-81-megapixels": ["--image", "{d}/big.png"],
    "image-10-gigapixels": ["--image", "{d}/bomb.png"],
    "trace-missing-directory": ["--trace", "{d}/no-such-dir/t.json"],
    "trace-is-a-directory": ["--trace", "{d}"],
    "trace-unwritable-sysfs": ["--trace", "/sys/mmspec-trace.json"],
    "trace-unwritable-proc": ["--trace", "/proc/version"],
    "feature-retired-eagle3": ["--drafter", "{d}/feat-retired-eagle3"],  # named by its file, no target needed
}

# Refused while or after the target loads (a bad target, or a drafter checked against the target).
AT_LOAD = {
    "target-missing": ["--target", "{d}/no-such-model"],
    "target-is-a-file": ["--target", "{d}/img.png"],
    "target-without-config": ["--target", "{d}/empty-dir"],
    "target-text-only": ["--target", "{t}/text-draft"],
    "target-long-name": ["--target", "x" * 5000],
    "prompt-with-image-placeholder": ["--prompt", "<image> describe"],
    "drafter-unknown-name": ["--drafter", "medusa"],
    "drafter-missing-dir": ["--drafter", "./no/such/dir"],
    "drafter-other-tokenizer": ["--drafter", "{t}/foreign-text"],
    "drafter-config-not-json": ["--drafter", "{d}/draft-bad-json"],
    "drafter-config-unknown-type": ["--drafter", "{d}/draft-bad-type"],
    "drafter-without-weights": ["--drafter", "{d}/draft-no-weights"],
    "drafter-empty-dir": ["--drafter", "{d}/empty-dir"],
    "feature-meta-not-json": ["--drafter", "{d}/feat-meta-not-json"],
    "feature-meta-a-list": ["--drafter", "{d}/feat-meta-list"],
    "feature-config-not-a-dict": ["--drafter", "{d}/feat-config-string"],
    "feature-target-missing": ["--drafter", "{d}/feat-no-target"],
    "feature-config-wrong-hidden": ["--drafter", "{d}/feat-wrong-hidden"],
    "feature-config-huge-layers": ["--drafter", "{d}/feat-huge-layers"],
    "feature-config-bad-layer-index": ["--drafter", "{d}/feat-bad-dream-layer"],
    "feature-config-bool-as-int": ["--drafter", "{d}/feat-bool-layers"],
    "feature-garbage-safetensors": ["--drafter", "{d}/feat-garbage-weights"],
    "feature-missing-safetensors": ["--drafter", "{d}/feat-no-weights"],
}


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _write_images(d: Path) -> None:
    image(0).save(d / "img.png")
    good = (d / "img.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "text.png").write_text("this is not an image\n")
    (d / "empty.png").write_bytes(b"")
    (d / "big.png").write_bytes(_png_claiming(9_000, 9_000))  # under PIL's own bomb limit, over ours
    (d / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))


def _write_trees(d: Path) -> None:
    (d / "big-tree.json").write_text(json.dumps([[a, b] for a in range(201) for b in range(200)]))  # 40,200 paths
    (d / "wide-tree.json").write_text(json.dumps([[a, b] for a in range(64) for b in range(64)]))  # 4,096 paths
    (d / "nested-tree.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "long-path-tree.json").write_text(json.dumps([[0] * 100_000]))
    (d / "oversize-tree.json").write_text(" " * 300_000 + "[[0]]")


def _write_draft_models(d: Path, tiny: Path) -> None:
    (d / "empty-dir").mkdir()
    for name in ("draft-bad-json", "draft-bad-type", "draft-no-weights"):
        shutil.copytree(tiny / "llava-draft", d / name)
    (d / "draft-bad-json" / "config.json").write_text("{")
    (d / "draft-bad-type" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    for weights in (d / "draft-no-weights").glob("*.safetensors"):
        weights.unlink()


def _write_feature_drafters(d: Path, tiny: Path) -> Path:
    """A real EAGLE drafter for the tiny LLaVA, then copies each broken in one way."""
    from mmspec import load_target
    from mmspec.drafters.feature.drafter import create_feature_drafter
    from mmspec.drafters.feature.files import META_FILE, WEIGHTS_FILE, save_feature_drafter

    tgt = load_target(str(tiny / "llava"), "cpu", "float32")
    ok = save_feature_drafter(create_feature_drafter("eagle", tgt, profile=[1.0, 1.0]), d / "feat-ok")
    meta = json.loads((ok / META_FILE).read_text())

    def variant(name: str, meta_text: str | None = None, weights: bytes | None = None, drop_weights=False):
        out = d / name
        shutil.copytree(ok, out)
        if meta_text is not None:
            (out / META_FILE).write_text(meta_text)
        if weights is not None:
            (out / WEIGHTS_FILE).write_bytes(weights)
        if drop_weights:
            (out / WEIGHTS_FILE).unlink()

    def with_config(**changes) -> str:
        return json.dumps({**meta, "config": {**meta["config"], **changes}})

    variant("feat-meta-not-json", meta_text="{not json")
    variant("feat-meta-list", meta_text=json.dumps([meta]))
    variant("feat-config-string", meta_text=json.dumps({**meta, "config": "eagle"}))
    variant("feat-no-target", meta_text=json.dumps({k: v for k, v in meta.items() if k != "target"}))
    variant("feat-wrong-hidden", meta_text=with_config(hidden=10**9))
    variant("feat-huge-layers", meta_text=with_config(n_layers=100_000))
    variant("feat-bad-dream-layer", meta_text=with_config(dream=True, dream_layers=[0, 1, 999]))
    # An old download of the retired eagle3 variant (a fused-feature network), as it was saved.
    variant("feat-retired-eagle3", meta_text=json.dumps({**meta, "variant": "eagle3", "config": {
        **meta["config"], "variant": "eagle3", "fuse3": True, "fuse_layers": [1, 2, 4], "w_feat": 0.0}}))
    variant("feat-bool-layers", meta_text=with_config(n_layers=True))
    variant("feat-garbage-weights", weights=bytes(range(256)) * 64)
    variant("feat-no-weights", drop_weights=True)
    return ok


@pytest.fixture(scope="module")
def fuzz_dir(tiny_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli_fuzz")
    _write_images(d)
    _write_trees(d)
    _write_draft_models(d, tiny_dir)
    _write_feature_drafters(d, tiny_dir)
    return d


def _argv(tiny_dir: Path, d: Path, extra: list[str]) -> list[str]:
    base = ["generate", "--target", str(tiny_dir / "llava"), "--image", str(d / "img.png"), "--prompt", "describe",
            "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]
    # Options given twice: argparse keeps the last, so each case overrides the good base value.
    return base + [a.replace("{d}", str(d)).replace("{t}", str(tiny_dir)) for a in extra]


@pytest.fixture
def load_calls(monkeypatch) -> list:
    """Every call the CLI makes to load_target, recorded (the real loader still runs)."""
    calls = []
    real = mmspec.load.load_target

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(mmspec.load, "load_target", counted)
    return calls


def _refused(argv: list[str], capsys) -> tuple[str, float]:
    """Run the CLI in-process; assert exit code 2, one `error:` line, nothing on stdout."""
    start = time.perf_counter()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors leave through sys.exit
        rc = e.code
    took = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and err.endswith("\n"), err
    assert "Traceback" not in err
    return err, took


@pytest.mark.parametrize("case", list(BEFORE_LOAD))
def test_refused_before_loading(case, tiny_dir, fuzz_dir, load_calls, capsys):
    _, took = _refused(_argv(tiny_dir, fuzz_dir, BEFORE_LOAD[case]), capsys)
    assert load_calls == [], "refused only after loading the target"
    assert took < BOUND_S


@pytest.mark.parametrize("case", list(AT_LOAD))
def test_refused_at_load(case, tiny_dir, fuzz_dir, capsys):
    _, took = _refused(_argv(tiny_dir, fuzz_dir, AT_LOAD[case]), capsys)
    assert took < BOUND_S


def test_messages_name_the_limits(tiny_dir, fuzz_dir, capsys):
    """The accepted ranges are stated, so a user can fix the input from the message alone."""
    expect = {"temperature-1e-300": "between 0.001 and 100", "seed-2**64": "0 <= seed < 2**63",
              "top-p-1e-300": "between 1e-06 and 1", "static-4096-nodes": "at most 512 paths",
              "static-40200-nodes": "over 256 KB",
              "dynamic-budget-over-limit": "BUDGET<=512", "static-33-deep-path": "at most 32 ranks",
              "trace-missing-directory": "does not exist", "device-bogus": "use cpu, cuda or cuda:N",
              "image-81-megapixels": "the limit is 64 million", "static-string-rank": "got '0'",
              "feature-retired-eagle3": "retired pre-format eagle3 drafter"}
    for case, words in expect.items():
        err, _ = _refused(_argv(tiny_dir, fuzz_dir, BEFORE_LOAD[case]), capsys)
        assert words in err, (case, err)


def test_the_unbroken_inputs_run(tiny_dir, fuzz_dir, capsys):
    """Control: the base command, and the feature drafter every broken copy came from, decode
    (exit 0), so the refusals above are caused by what each case changed. The trace check does not
    leave a file behind when it only probes."""
    trace = fuzz_dir / "ok-trace.json"
    for extra in ([], ["--drafter", str(fuzz_dir / "feat-ok"), "--tree", "dynamic:4,2,2", "--trace", str(trace)]):
        assert main(_argv(tiny_dir, fuzz_dir, extra)) == 0
        out, err = capsys.readouterr()
        assert out.strip() and len(err.splitlines()) == 1 and err.startswith("[speculative"), err
    assert json.loads(trace.read_text())["token_ids"]
    probe = fuzz_dir / "never-written.json"
    assert main(_argv(tiny_dir, fuzz_dir, ["--trace", str(probe), "--temperature", "nan"])) == 2
    assert not probe.exists()
    capsys.readouterr()


def test_config_check_guards_the_library_too():
    """The app and library callers get the same refusals through DecodeConfig.check()."""
    from mmspec import DecodeConfig, InputError

    bad = [{"temperature": float("nan")}, {"temperature": True}, {"temperature": "1"}, {"top_p": float("inf")},
           {"seed": 2**63}, {"seed": 1.0}, {"max_new_tokens": 2.0}, {"tree": 4}, {"tree": "static:[[0]" + "]" * 9}]
    for fields in bad:
        with pytest.raises(InputError):
            DecodeConfig(**fields).check()
    DecodeConfig(temperature=1e-3, top_p=1e-6, seed=2**63 - 1, tree="static:[[0],[1],[0,0]]").check()


SUBPROCESS_CASES = ["temperature-nan", "fast-path-unknown", "trace-missing-directory", "device-bogus",
                    "static-40200-nodes", "feature-garbage-safetensors", "feature-retired-eagle3"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_refused_end_to_end(case, tiny_dir, fuzz_dir):
    extra = BEFORE_LOAD.get(case) or AT_LOAD[case]
    r = subprocess.run([sys.executable, "-m", "mmspec", *_argv(tiny_dir, fuzz_dir, extra)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr


