"""The Gradio app, launched on tiny models and driven through gradio_client (its public API)."""
from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import tiny_models

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*:Warning:gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

PROMPT = "Describe the image."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_examples(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_models.image(0, size=96).save(folder / "noise.png")
    (folder / "examples.json").write_text(json.dumps([{"image": "noise.png", "prompt": PROMPT}]))
    return folder


def tiny_demo(tiny_dir: Path, examples: Path, **kw):
    return app.build_demo(
        default_target=str(tiny_dir / "llava"),
        drafters=[("tiny target as its own draft", str(tiny_dir / "llava")),
                  ("tiny draft VLM", str(tiny_dir / "llava-draft")),
                  ("tiny text-only LM", str(tiny_dir / "text-draft"))],
        examples_dir=examples, max_new_tokens_limit=64, **{"race_min_s": 0.5, "race_max_s": 2.0, "fps": 10, **kw})


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    examples = make_examples(tmp_path_factory.mktemp("examples"))
    demo = tiny_demo(tiny_dir, examples)
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield client, tiny_dir, examples
    demo.close()


class Named(list):
    """An event's outputs, by position or by the name app.OUTPUTS gives it (updates unwrapped to values)."""

    def __init__(self, values, event: str):
        super().__init__(values)
        self.names = app.api_outputs(event)

    def __getitem__(self, key):
        if isinstance(key, str):
            value = super().__getitem__(self.names.index(key))
            return value.get("value") if isinstance(value, dict) and value.get("__type__") == "update" else value
        return super().__getitem__(key)


def run(client, image, prompt=PROMPT, target=None, drafter=None, shape="chain", chain=4, budget=12, depth=4, topk=3,
        temperature=0.0, top_p=1.0, seed=0, max_tokens=24, rivals=(), repeats=3):
    job = client.submit(image, prompt, target, drafter, list(rivals), shape, chain, budget, depth, topk, temperature,
                        top_p, seed, max_tokens, repeats, api_name="/run")
    updates = [Named(u, "run") for u in job]  # streamed outputs
    return updates, Named(job.result(), "run")


def load(client, path) -> Named:
    return Named(client.predict(handle_file(str(path)), api_name="/load_trace"), "load_trace")


STATUS, TRACE = "status", "trace_file"


def test_api_names(served):
    client, _, _ = served
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/run", "/replay_race", "/inspect_step", "/load_trace", "/stop"} <= names


def test_run_streams_both_outputs_and_the_trace(served):
    client, tiny, examples = served
    updates, res = run(client, handle_file(str(examples / "noise.png")), target=str(tiny / "llava"),
                       drafter=str(tiny / "llava"), shape="tree (dynamic)")
    assert len(updates) >= 2  # loading / measuring... then the final views
    assert res[STATUS].startswith("✓ Done"), res[STATUS]
    assert "identical" in res[STATUS]
    assert res["van_text"] and res["van_text"] == res["spec_text"]  # lossless at temperature 0
    assert "</s>" not in res["van_text"]  # the end of text is a marker in the panes, not content
    data = json.loads(Path(res[TRACE]).read_text())
    assert data["format"] == "mmspec-race"
    assert data["vanilla"]["mode"] == "vanilla" and data["speculative"]["mode"] == "speculative"
    assert data["vanilla"]["token_ids"] == data["speculative"]["token_ids"]
    assert data["speculative"]["config"]["tree"] == "dynamic:12,4,3"
    assert [m["label"] for m in data["measurements"]] == ["vanilla", "tiny target as its own draft"]
    layers = json.loads((tiny / "llava" / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert len(data["target_entropy"]) == layers  # the target's attention per layer, whatever the drafter

    # the race replays the median runs: the panes end full, vanilla's tokens all the target's own
    final = Named(list(client.submit(1.0, api_name="/replay_race"))[-1], "replay_race")
    assert 'class="tok tok-accepted"' in final["pane1"] and 'class="tok tok-target"' in final["pane0"]
    assert "race finished" in final["clock"] and "τ" in final["pane1"] and "speed-up" in final["pane1"]

    # the trace replays offline through the upload endpoint, and the inspector works on it
    status = load(client, res[TRACE])[STATUS]
    assert status.startswith("✓ Trace loaded"), status
    tree, info, _vmap = client.predict(2, api_name="/inspect_step")
    assert tree is not None and "**Step 2**" in info


def test_repeated_measurements_with_spreads_and_honest_verdicts(served):
    """Every timing is a median of >= 3 timed runs with its spread, on a named device and dtype; the
    random drafter (tau 1.00) is called faster only if its whole range beat vanilla's, never on a median."""
    client, tiny, examples = served
    _, res = run(client, handle_file(str(examples / "noise.png")), target=str(tiny / "llava"), drafter="random",
                 rivals=["ngram"], max_tokens=16, repeats=5)
    assert res[STATUS].startswith("✓ Done"), res[STATUS]
    ms = res["measurements"]
    assert [m["label"] for m in ms] == ["vanilla", "random (worst case)", "n-gram (prompt lookup)"]
    for m in ms:
        for key in ("tokens_per_s", "wall_s"):
            spread = m[key]
            assert spread["n"] == 5 and spread["min"] <= spread["p10"] <= spread["median"] <= spread["p90"] <= spread["max"]
        assert m["device"] == "cpu" and m["dtype"] and m["same_tokens_every_run"] is True
        assert m["accepted_per_step"] == pytest.approx(m["tau"] - 1)
    van, rnd = ms[0]["tokens_per_s"], ms[1]
    assert rnd["tau"] == pytest.approx(1.0) and "speedup" not in ms[0]
    sp = rnd["speedup"]
    assert sp["min"] <= sp["median"] <= sp["max"]
    faster_beyond_spread = rnd["tokens_per_s"]["min"] > van["max"]
    assert (sp["verdict"] == "faster") == faster_beyond_spread
    if not faster_beyond_spread:
        assert "random (worst case): τ 1.00" in res[STATUS] and "faster" not in res[STATUS].split(";")[0]
    assert "median" in res["numbers"] and "cpu, float32" in res["numbers"]


def test_three_drafters_race_fills_progressively(served):
    client, tiny, examples = served
    _, res = run(client, handle_file(str(examples / "noise.png")), target=str(tiny / "llava"),
                 drafter=str(tiny / "llava-draft"), rivals=[str(tiny / "llava"), "ngram"], max_tokens=20)
    assert res[STATUS].startswith("✓ Done"), res[STATUS]
    assert len(res["measurements"]) == 4
    frames = [Named(u, "replay_race") for u in client.submit(2.0, api_name="/replay_race")]
    counts = [[f[f"pane{i}"].count('class="tok ') if isinstance(f[f"pane{i}"], str) else None for i in range(4)]
              for f in frames]
    shown = [c for c in counts if None not in c]
    assert len(shown) >= 3, counts  # several snapshots, each pane growing, all four panes racing
    assert all(a <= b for x, y in zip(shown, shown[1:]) for a, b in zip(x, y))
    assert sum(shown[0]) < sum(shown[-1])
    for i in range(4):
        html_ = frames[-1][f"pane{i}"]
        assert html_.count("tok-end") <= 1 and "&lt;/s&gt;" not in html_ and "</s>" not in html_


def test_stop_mid_run_keeps_tokens_and_says_so(served, monkeypatch, tmp_path):
    """Stop ends the run after its current step: status 'Stopped after N tokens', the panes keep what was
    produced, none still says measuring. Each step is slowed (in this process) so that Stop lands mid-run
    even if the tiny model ends its answer early; the picture is not an example, so nothing is replayed
    from the example cache."""
    import webui.live

    class Slow(webui.live.Decoder):
        def __iter__(self):
            for s in super().__iter__():
                time.sleep(0.2)
                yield s

    monkeypatch.setattr(webui.live, "Decoder", Slow)
    client, tiny, _ = served
    picture = tmp_path / "fresh.png"
    tiny_models.image(9, size=64).save(picture)
    job = client.submit(handle_file(str(picture)), PROMPT, str(tiny / "llava"), "ngram", [], "chain", 4,
                        12, 4, 3, 0.0, 1.0, 5, 64, 3, api_name="/run")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(Named(u, "run")[STATUS].startswith("Measuring")
                                                  for u in job.outputs()):
        time.sleep(0.1)
    client.predict(api_name="/stop")
    res = Named(job.result(), "run")
    assert res[STATUS].startswith("Stopped after ") and " token" in res[STATUS], res[STATUS]
    n = int(res[STATUS].split()[2])
    last = {}  # each pane's latest content
    for u in job.outputs():
        for i in range(4):
            value = Named(u, "run")[f"pane{i}"]
            if isinstance(value, str) and value:
                last[i] = value
    assert all("measuring" not in p and "waiting" not in p for p in last.values()), last  # no stale state
    assert 'data-state="stopped"' in last[0]
    assert n in [p.count('class="tok ') for p in last.values()]  # what the stopped run produced is still there
    assert "⚠" not in res[STATUS] and "rror" not in res[STATUS]


@pytest.mark.parametrize("drafter", ["ngram", "random", "text-draft", "llava-draft"])
def test_every_drafter_kind_runs(served, drafter):
    client, tiny, examples = served
    name = str(tiny / drafter) if "-" in drafter else drafter
    _, res = run(client, handle_file(str(examples / "noise.png")), target=str(tiny / "llava"), drafter=name,
                 max_tokens=12)
    assert res[STATUS].startswith("✓ Done"), res[STATUS]
    assert res["van_text"] == res["spec_text"]


def test_sampling_run(served):
    client, tiny, examples = served
    _, res = run(client, handle_file(str(examples / "noise.png")), target=str(tiny / "llava-peaky"),
                 drafter=str(tiny / "llava-draft"), shape="tree (dynamic)", temperature=0.9, top_p=0.9, seed=3,
                 max_tokens=16)
    assert res[STATUS].startswith("✓ Done"), res[STATUS]
    data = json.loads(Path(res[TRACE]).read_text())
    assert data["speculative"]["config"]["temperature"] == 0.9 and len(data["speculative"]["token_ids"]) > 0


def test_bad_inputs_give_clear_messages(served, tmp_path):
    client, tiny, examples = served
    img = handle_file(str(examples / "noise.png"))
    target = str(tiny / "llava")
    cases = [
        (dict(image=img, prompt="   "), "prompt is empty"),
        (dict(image=None), "No image"),
        (dict(image=img, max_tokens=10_000), "max new tokens must be between 1 and 64"),
        (dict(image=img, target="nobody/no-such-model-offline"), "could not load"),
        (dict(image=img, drafter="/no/such/draft-model"), "does not exist"),
        (dict(image=img, drafter="not-a-drafter"), "unknown drafter"),
        (dict(image=img, shape="tree (dynamic)", budget=0), "budget 1-128"),
        (dict(image=img, shape="chain", chain=33), "chain length must be 1-32"),
        (dict(image=img, temperature=-1), "temperature"),
    ]
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a picture")
    cases.append((dict(image=handle_file(str(fake))), "not a readable image"))
    for kw, message in cases:
        kw = {"target": target, "drafter": "ngram", **kw}
        _, res = run(client, **kw)
        assert res[STATUS].startswith("⚠") and message in res[STATUS], (kw, res[STATUS])
    # still alive and well
    _, res = run(client, img, target=target, drafter="ngram", max_tokens=4)
    assert res[STATUS].startswith("✓ Done")


def test_huge_image_is_downscaled(served, tmp_path):
    client, tiny, _ = served
    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 1000), (30, 120, 200)).save(big)
    _, res = run(client, handle_file(str(big)), target=str(tiny / "llava"), drafter="ngram", max_tokens=4)
    assert res[STATUS].startswith("✓ Done") and "downscaled from 3000×1000 to 2048×683" in res[STATUS]


def test_bad_trace_upload(served, tmp_path):
    client, _, _ = served
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    status = load(client, bad)[STATUS]
    assert status.startswith("⚠") and "not an mmspec trace" in status


def test_missing_default_is_stated(tmp_path):
    demo = app.build_demo(default_target=str(tmp_path / "no-model-here"), examples_dir=tmp_path)
    cfg = demo.mmspec_config
    assert cfg.target_missing and cfg.examples == []
    banners = [b for b in demo.blocks.values() if "embedded default model is missing" in str(getattr(b, "value", ""))]
    assert banners
    values = [v for _, v in cfg.drafters]
    assert "ngram" in values and "random" in values


def test_examples_and_drafters_from_config(tiny_dir, tmp_path):
    examples = make_examples(tmp_path / "ex")
    cfg = tiny_demo(tiny_dir, examples).mmspec_config
    assert cfg.examples == [(str((examples / "noise.png").resolve()), PROMPT)]
    assert cfg.default_drafter == str(tiny_dir / "llava") and cfg.token_limit == 64


# ------------------------------------------------------------------ what a request may read

FILE_META = {"_type": "gradio.FileData"}


def raw_call(url: str, api: str, data: list) -> str:
    """One event through Gradio's HTTP API (no client-side upload): the whole event stream as text."""
    import httpx

    base = url.rstrip("/") + "/gradio_api"
    event = httpx.post(f"{base}/call/{api}", json={"data": data}, timeout=30).json()["event_id"]
    return httpx.get(f"{base}/call/{api}/{event}", timeout=120).text


def server_files(tmp_path: Path) -> list[str]:
    picture = tmp_path / "server-side.png"  # a readable image that was never uploaded
    tiny_models.image(5, size=64).save(picture)
    return ["/etc/passwd", str(ROOT / "assets" / "screenshot.png"),
            str(ROOT / "assets" / "examples" / "example_1_describe.png"), str(picture)]


def test_run_refuses_server_paths(served, tmp_path):
    """An image is read only if it came through Gradio's upload (or is a shipped example of this app)."""
    client, tiny, examples = served
    settings = [PROMPT, str(tiny / "llava"), "ngram", [], "chain", 2, 8, 2, 2, 0.0, 1.0, 0, 2, 3]
    for path in server_files(tmp_path):
        for payload in (path, {"path": path}, {"path": path, "meta": FILE_META}):
            text = raw_call(client.src, "run", [payload] + settings + [[]])
            assert "✓" not in text and "data:image" not in text, (payload, text[-300:])
            assert "not uploaded" in text or "validation error" in text, (payload, text[-300:])
        _, res = run(client, {"path": path}, target=str(tiny / "llava"), drafter="ngram", max_tokens=2)
        assert res[STATUS].startswith("⚠") and "not uploaded to the app" in res[STATUS], res[STATUS]
    # the app's own example, named by its path, and a real upload both run
    for payload in ({"path": str(examples / "noise.png")}, handle_file(str(tmp_path / "server-side.png"))):
        _, res = run(client, payload, target=str(tiny / "llava"), drafter="ngram", max_tokens=2)
        assert res[STATUS].startswith("✓"), res[STATUS]


def test_trace_loading_refuses_server_paths(served, tmp_path):
    client, tiny, examples = served
    _, res = run(client, handle_file(str(examples / "noise.png")), target=str(tiny / "llava"), drafter="ngram",
                 max_tokens=3, seed=11)
    trace = tmp_path / "trace.json"  # a valid trace, on the server's disk but never uploaded
    trace.write_text(Path(res[TRACE]).read_text())
    for path in [str(trace), "/etc/passwd"]:
        for payload in (path, {"path": path}, {"path": path, "meta": FILE_META}):
            text = raw_call(client.src, "load_trace", [payload, []])
            assert "Trace loaded" not in text, (payload, text[-300:])
            assert "not uploaded" in text or "validation error" in text or "Invalid file" in text, text[-300:]
    status = load(client, trace)[STATUS]  # uploaded: fine
    assert status.startswith("✓ Trace loaded"), status


def test_hub_pairs_hidden_offline_and_offered_online(tiny_dir, tmp_path, monkeypatch):
    """Public mode offers the curated hub pairs only where the hub can be reached: offline the menu
    is hidden (one target, no hub drafters), not a list of models that fail to load."""
    def menus():
        demo = tiny_demo(tiny_dir, make_examples(tmp_path / "ex"), public=True)
        target = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "mmspec-target")
        hub = [v for label, v in demo.mmspec_config.drafters if label.endswith("(hub)")]
        return target, hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target, hub = menus()
    assert not target.visible and len(target.choices) == 1 and hub == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    target, hub = menus()
    assert target.visible and len(target.choices) > 1 and "Qwen/Qwen2-0.5B-Instruct" in hub
