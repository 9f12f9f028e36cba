"""The Gradio app, launched on tiny models and driven through gradio_client (its public API)."""
from __future__ import annotations

import json
import socket
import sys
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
        examples_dir=examples, max_new_tokens_limit=64, race_min_s=0.5, race_max_s=2.0, fps=10, **kw)


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    examples = make_examples(tmp_path_factory.mktemp("examples"))
    demo = tiny_demo(tiny_dir, examples)
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield client, tiny_dir, examples
    demo.close()


def run(client, image, prompt=PROMPT, target=None, drafter=None, shape="chain", chain=4, budget=12, depth=4, topk=3,
        temperature=0.0, top_p=1.0, seed=0, max_tokens=24):
    job = client.submit(image, prompt, target, drafter, shape, chain, budget, depth, topk, temperature, top_p, seed,
                        max_tokens, api_name="/run")
    updates = list(job)  # streamed outputs
    return updates, job.result()


# output positions of /run (see app.run_outputs; gr.State outputs are not part of the API)
STATUS, VAN_HEAD, SPEC_HEAD, VAN_PANE, SPEC_PANE = 0, 1, 2, 3, 4
VAN_TEXT, SPEC_TEXT, TRACE = 13, 14, 21


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
    assert res[VAN_TEXT] and res[VAN_TEXT] == res[SPEC_TEXT]  # lossless at temperature 0
    assert 'class="tok tok-accepted"' in res[SPEC_PANE] and 'class="tok tok-target"' in res[VAN_PANE]
    assert "τ" in res[SPEC_HEAD] and "speed-up" in res[SPEC_HEAD]
    data = json.loads(Path(res[TRACE]).read_text())
    assert data["format"] == "mmspec-race"
    assert data["vanilla"]["mode"] == "vanilla" and data["speculative"]["mode"] == "speculative"
    assert data["vanilla"]["token_ids"] == data["speculative"]["token_ids"]
    assert data["speculative"]["config"]["tree"] == "dynamic:12,4,3"

    # the trace replays offline through the upload endpoint, and the inspector works on it
    status = client.predict(handle_file(res[TRACE]), api_name="/load_trace")[STATUS]
    assert status.startswith("✓ Trace loaded"), status
    tree, info, _vmap = client.predict(2, api_name="/inspect_step")
    assert tree is not None and "**Step 2**" in info


@pytest.mark.parametrize("drafter", ["ngram", "random", "text-draft", "llava-draft"])
def test_every_drafter_kind_runs(served, drafter):
    client, tiny, examples = served
    name = str(tiny / drafter) if "-" in drafter else drafter
    _, res = run(client, handle_file(str(examples / "noise.png")), target=str(tiny / "llava"), drafter=name,
                 max_tokens=12)
    assert res[STATUS].startswith("✓ Done"), res[STATUS]
    assert res[VAN_TEXT] == res[SPEC_TEXT]


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
    status = client.predict(handle_file(str(bad)), api_name="/load_trace")[STATUS]
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
    settings = [PROMPT, str(tiny / "llava"), "ngram", "chain", 2, 8, 2, 2, 0.0, 1.0, 0, 2]
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
    status = client.predict(handle_file(str(trace)), api_name="/load_trace")[STATUS]  # uploaded: fine
    assert status.startswith("✓ Trace loaded"), status
