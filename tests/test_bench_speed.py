"""bench/speed.py end to end on the tiny test models: files written, numbers numeric, lossless flags,
a broken drafter recorded as an error row without stopping the run, and the time budget honoured.
Timings are checked for shape and sign only, never against each other (a busy machine reorders them)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _argv(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--target", str(tiny_dir / "llava"), "--assistant", str(tiny_dir / "llava-draft"),
            "--drafters", f"{tiny_dir / 'llava-draft'},ngram,{tiny_dir / 'missing-drafter'}",
            "--trees", "chain:3;dynamic:6,3,2", "--n", "2", "--max-new-tokens", "8", "--temperatures", "0,1",
            "--device", "cpu", "--dtype", "float32", "--out", str(out), *extra]


@pytest.mark.slow
def test_speed_bench_tiny(speed, tiny_dir, tmp_path):
    out = tmp_path / "speed.json"
    methods = "engine:vanilla,hf:generate,hf:assisted,hf:prompt-lookup,engine:llava-draft,engine:ngram,engine:missing"
    result = speed.main(_argv(tiny_dir, out, "--methods", methods))
    for path in (out, out.with_suffix(".md"), out.with_suffix(".fig.json")):
        assert path.exists() and path.stat().st_size > 0, path
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    fig = json.loads(out.with_suffix(".fig.json").read_text())
    assert {t["name"] for t in fig["data"]} == {"T=0", "T=1"}
    rows = {(r["method"], r["temperature"]): r for r in data["rows"]}
    engine = [f"engine:llava-draft:{t}" for t in ("chain:3", "dynamic:6,3,2")] + ["engine:ngram:chain:3"]
    for temp in (0.0, 1.0):
        for method in ["engine:vanilla", "hf:generate", "hf:generate:static", *engine]:
            r = rows[(method, temp)]
            assert r["error"] is None, r
            assert all(isinstance(x, float) and x > 0 and math.isfinite(x) for x in r["tokens_per_s_all"])
            assert r["tokens_per_s_p10"] <= r["tokens_per_s"] <= r["tokens_per_s_p90"]
            assert r["tau"] >= 1.0 and r["speedup"] > 0
        assert rows[("engine:vanilla", temp)]["speedup"] == pytest.approx(1.0)
        # A drafter that does not exist is a row with an error, and the methods after it still ran.
        assert "does not exist" in rows[("engine:missing-drafter:chain:3", temp)]["error"]
        # HF's assisted / prompt-lookup paths may refuse a VLM; either a measurement or an error.
        for method in ("hf:assisted:llava-draft", "hf:prompt-lookup"):
            r = rows[(method, temp)]
            assert r["error"] or r["tokens_per_s"] > 0
    for method in engine:
        r = rows[(method, 0.0)]
        assert r["lossless"] is True, method
        assert 0 <= r["draft_pct"] <= 100 and r["draft_pct"] + r["verify_pct"] + r["overhead_pct"] == pytest.approx(100)
        # Decode-only numbers are reported and are plain positive measurements. No timing is compared
        # with another: on a busy machine "decode tok/s > end-to-end tok/s" failed (issue 13).
        for key in ("decode_tokens_per_s", "prefill_ms", "decode_speedup"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (method, key, r[key])
        assert r["drafter_start_ms"] >= 0
    for method in ("hf:generate", "hf:generate:static"):  # HF greedy == engine vanilla, token for token
        assert rows[(method, 0.0)]["lossless"] is True
    assert data["meta"]["hf_greedy_equals_engine_vanilla"] == {"hf:generate": True, "hf:generate:static": True}
    assert rows[("engine:vanilla", 1.0)]["lossless"] is None
    md = out.with_suffix(".md").read_text()
    assert "## T=0" in md and "## T=1" in md and "| engine:llava-draft:chain:3 |" in md and "measured" in md
    assert "decode tok/s" in md


def test_speed_bench_time_budget(speed, tiny_dir, tmp_path):
    out = tmp_path / "budget.json"
    speed.main(_argv(tiny_dir, out, "--methods", "engine:ngram", "--time-budget-s", "0"))
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["error"] == "skipped: time budget" for r in rows)
    assert out.with_suffix(".md").exists() and out.with_suffix(".fig.json").exists()
