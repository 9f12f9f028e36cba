"""bench/scale.py: the --tiny CPU run writes sane timings and projections, and the real configs have 7B sizes."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)

TAU = "chain:3=2.5;dynamic:6,2,4=3.0"
OVERHEAD = 0.25


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "scale.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: a second thread only adds contention on a busy CPU
    try:
        res = scale.main(["--tiny", "--device", "cpu", "--models", "llava15-7b,qwen25vl-7b", "--q", "1,2,4,8",
                          "--draft-q", "1,4", "--warmup", "1", "--reps", "2", "--prefill-reps", "1",
                          "--tau", TAU, "--overhead-ms", str(OVERHEAD), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, res


def _timings(node, path=""):
    """Every (path, value) under a `median` or `samples` key."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "median":
                yield f"{path}.median", v
            elif k == "samples":
                yield from ((f"{path}.samples", s) for s in v)
            else:
                yield from _timings(v, f"{path}.{k}")


def _lerp(table, x):
    pts = sorted((int(q), v["median"]) for q, v in table.items())
    for (q0, t0), (q1, t1) in zip(pts, pts[1:]):
        if q0 <= x <= q1:
            return t0 + (x - q0) / (q1 - q0) * (t1 - t0)
    raise AssertionError(f"{x} outside {pts}")


def test_files_timings_and_labels(run):
    out, res = run
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res))
    assert set(data["models"]) == {"llava15-7b", "qwen25vl-7b"}
    assert data["label"] == "projection" and "projection" in data["note"].lower()
    md = out.with_name("scale.md").read_text()
    fig = json.loads(out.with_name("scale.fig.json").read_text())
    assert md.startswith("# ") and "projection" in md.splitlines()[0]
    assert all("projection" in line for line in md.splitlines() if line.startswith("#"))
    assert "projection" in fig["layout"]["title"]["text"]
    assert any("projection" in a["text"] for a in fig["layout"]["annotations"])
    for name, m in data["models"].items():
        assert m["complete"] and set(m["paths"]) == {"eager", "graphs"}
        timings = list(_timings(m))
        # per path: verify tree + causal (4 q), prefill, 2 drafters (2 q); a median and 2 samples each
        assert len(timings) == 2 * (2 * 4 * 3 + 2 + 2 * 2 * 3)
        for path, v in timings:
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (name, path, v)
        for path, b in m["paths"].items():
            assert set(b["tree"]) == set(b["causal"]) == {"1", "2", "4", "8"}
            assert b["prompt_tokens"] >= scale.TEXT_TOKENS + 16  # text + the tiny image's tokens
            assert b["cuda_graphs"] is False and b["graph_error"] is None  # no CUDA here
            assert all(set(d) == {"1", "4"} for d in b["drafters"].values())
            assert len(b["projections"]) == 4 and all(r["label"] == "projection" for r in b["projections"])
            assert b["curve"]["label"] == "projection" and b["curve"]["budgets"] == list(range(1, 65))
            assert set(b["curve"]["speedup"]) == {"2.0", "3.0", "4.0", "5.0"}
            assert f"## {name}, {path}: measured component times" in md
            assert f"### {name}, {path}: projected speed-up (projection" in md
        assert all(n > 0 for n in m["drafter_params"].values())


def test_projection_is_the_formula(run):
    out, _ = run
    data = json.loads(out.read_text())
    for m in data["models"].values():
        for b in m["paths"].values():
            t1 = b["causal"]["1"]["median"]
            rows = {(r["shape"], r["drafter"]): r for r in b["projections"]}
            for drafter, d in b["drafters"].items():
                # chain:3 -> verify 4 tokens causally (measured), 3 draft forwards of 1 token
                chain = rows[("chain:3", drafter)]
                assert (chain["B"], chain["D"], chain["k"]) == (3, 3, 1)
                want = 2.5 * t1 / (b["causal"]["4"]["median"] + 3 * d["1"]["median"] + OVERHEAD)
                assert chain["projected_speedup"] == pytest.approx(want, rel=1e-12)
                # dynamic:6,2,4 -> verify 7 tokens with the tree mask (between measured 4 and 8), 2 forwards of 4
                dyn = rows[("dynamic:6,2,4", drafter)]
                assert (dyn["B"], dyn["D"], dyn["k"]) == (6, 2, 4)
                want = 3.0 * t1 / (_lerp(b["tree"], 7) + 2 * d["4"]["median"] + OVERHEAD)
                assert dyn["projected_speedup"] == pytest.approx(want, rel=1e-12)
            # curve at budget 7: verify q=8 (tree), depth 5 x EAGLE head at q=4
            want = 4.0 * t1 / (b["tree"]["8"]["median"] + 5 * b["drafters"]["eagle_head"]["4"]["median"] + OVERHEAD)
            assert b["curve"]["speedup"]["4.0"][6] == pytest.approx(want, rel=1e-12)


def test_interp_and_tau_parsing():
    table = {"1": {"median": 10.0}, "4": {"median": 16.0}, "8": {"median": 24.0}}
    assert scale.interp(table, 4) == 16.0
    assert scale.interp(table, 2) == pytest.approx(12.0)
    assert scale.interp(table, 10) == pytest.approx(28.0)  # extrapolated along the last segment
    rows = scale.parse_tau("chain:4=3.9; dynamic:24,5,4=4.2")
    assert [(r["B"], r["D"], r["k"], r["tau"]) for r in rows] == [(4, 4, 1, 3.9), (24, 5, 4, 4.2)]
    for bad in ("chain:4", "static:[[0]]=2.0"):
        with pytest.raises(SystemExit):
            scale.parse_tau(bad)


@pytest.mark.parametrize("name, billions, text_hidden, image_tokens", [
    ("llava15-7b", 7.06, 4096, 576),  # Llama-2-7B (vocab 32064) + CLIP ViT-L/14-336 + projector
    ("qwen25vl-7b", 8.29, 3584, 576),
])
def test_real_configs_have_7b_sizes(name, billions, text_hidden, image_tokens):
    model = scale.build(name, tiny=False, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - billions) < 0.05, n
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.config.get_text_config().hidden_size == text_hidden
    ids = scale.prompt_inputs(model, tiny=False)["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == image_tokens
