"""The app under hostile or heavy use: public mode, crafted traces, many clients, many runs.

Memory is the resident set of this process (the server runs in it, on tiny models); bounds are
fixed and generous (no test compares two timings).
"""
from __future__ import annotations

import copy
import gc
import json
import threading
import time
from pathlib import Path

import pytest

import crafted
import tiny_models
from test_app import STATUS, app, free_port, load, make_examples, run, tiny_demo

pytestmark = pytest.mark.filterwarnings("ignore:.*:Warning:gradio")
from gradio_client import Client, handle_file  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def settle() -> float:
    gc.collect()
    app.release_memory()
    time.sleep(0.5)
    return rss_mb()


def serve(demo) -> Client:
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return Client(f"http://127.0.0.1:{port}/", verbose=False)


@pytest.fixture(scope="module")
def public(tiny_dir, tmp_path_factory):
    examples = make_examples(tmp_path_factory.mktemp("examples"))
    demo = tiny_demo(tiny_dir, examples, public=True)
    client = serve(demo)
    yield client, tiny_dir, examples, demo
    demo.close()


def test_public_mode_refuses_typed_models(public, tmp_path):
    client, tiny, examples, demo = public
    cfg = demo.mmspec_config
    assert cfg.public
    dropdowns = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None) in ("mmspec-target",
                                                                                                "mmspec-drafter")}
    assert not dropdowns["mmspec-target"].allow_custom_value and not dropdowns["mmspec-drafter"].allow_custom_value
    img = handle_file(str(examples / "noise.png"))
    listed = str(tiny / "llava")
    (tmp_path / "alias").symlink_to(tiny / "llava-peaky")
    for target, drafter in [(str(tiny / "llava-peaky"), "ngram"), ("someone/any-model", "ngram"),
                            (listed, str(tiny / "llava-peaky-draft")), (listed, "someone/draft-model"),
                            (str(tmp_path / "alias"), "ngram")]:
        _, res = run(client, img, target=target, drafter=drafter, max_tokens=2)
        assert res[STATUS].startswith("⚠") and "public app runs only" in res[STATUS], (target, drafter, res[STATUS])
    _, res = run(client, img, target=listed, drafter="ngram", max_tokens=500)
    assert "between 1 and 64" in res[STATUS]
    _, res = run(client, img, target=listed, drafter=str(tiny / "llava-draft"), max_tokens=2)
    assert res[STATUS].startswith("✓ Done"), res[STATUS]


def crafted_cases(race: dict) -> dict[str, str]:
    """name -> file text of a trace the app must refuse."""
    def mutate(fn):
        bad = copy.deepcopy(race)
        fn(bad)
        return json.dumps(bad)

    first = next(s for s in race["speculative"]["steps"] if s["tree"]["tokens"])
    k = race["speculative"]["steps"].index(first)
    van = race["vanilla"]
    many = dict(van, steps=[dict(van["steps"][-1], index=i) for i in range(150_000)])
    return {
        "self-parent cycle": mutate(lambda r: r["speculative"]["steps"][k]["tree"]["parents"].__setitem__(0, 0)),
        "grid [1, 250000]": mutate(lambda r: r["speculative"]["steps"][1]["extras"].__setitem__(
            "visual_map", {"grid": [1, 250000], "status": ["kept"] * 250000})),
        "NaN time": json.dumps(race).replace('"wall_s": ', '"wall_s": NaN, "w": ', 1),
        "1e308 time": mutate(lambda r: r["vanilla"]["stats"].__setitem__("wall_s", 1e308)),
        "wrong types": mutate(lambda r: r["vanilla"]["steps"][1].__setitem__("index", '<img src=x onerror="1">')),
        "huge int": mutate(lambda r: r["vanilla"]["config"].__setitem__("seed", 2**70)),
        "150k steps": json.dumps({"vanilla": many}),
    }


def load_trace(client, path: Path) -> str:
    try:
        return load(client, path)[STATUS]
    except Exception as e:  # noqa: BLE001 - Gradio refuses an over-size upload itself, with a message
        return f"refused by Gradio: {e}"


@pytest.mark.slow
def test_crafted_traces_refused_quickly_memory_returns(public, tmp_path, monkeypatch):
    import httpx

    client, tiny, _, _ = public
    server_s: list[float] = []  # time the server spends reading and checking each trace

    def timed_load(*args, real=app.traceio.load):
        t0 = time.perf_counter()
        try:
            return real(*args)
        finally:
            server_s.append(time.perf_counter() - t0)

    monkeypatch.setattr(app.traceio, "load", timed_load)
    race = crafted.real_race(tiny)
    good = crafted.write(tmp_path / "good.json", race)
    cases = {name: crafted.write(tmp_path / f"bad-{i}.json", text) for i, (name, text) in
             enumerate(crafted_cases(race).items())}  # written first: the test's own strings are not in the count
    assert load_trace(client, good).startswith("✓ Trace loaded")  # warm the path once
    before = settle()
    for name, path in cases.items():
        server_s.clear()
        t0 = time.perf_counter()
        status = load_trace(client, path)
        took = time.perf_counter() - t0
        print(f"{name}: {path.stat().st_size / 2**20:.1f} MB refused, server {sum(server_s):.3f} s, round trip "
              f"{took:.2f} s: {status[:100]}")
        assert status.startswith("⚠ this trace is malformed") or "exceeds the maximum file size" in status, \
            (name, status)
        assert sum(server_s) < 1.0 and took < 10.0, (name, server_s, took)  # fixed, generous bounds
        time.sleep(3.1)  # stay under the public rate limit (20 loads a minute)
    # the server refuses an over-size upload too (the client above refused it before sending)
    with open(cases["150k steps"], "rb") as f:
        reply = httpx.post(client.src.rstrip("/") + "/gradio_api/upload", files={"files": f}, timeout=60)
    assert reply.status_code == 413, reply.status_code
    after = settle()
    print(f"RSS before {before:.0f} MB, after {after:.0f} MB")
    assert after <= before * 1.10
    assert load_trace(client, good).startswith("✓ Trace loaded")  # still serving


@pytest.mark.slow
def test_sixteen_clients(tiny_dir, tmp_path, monkeypatch):
    """16 clients at once against a queue of 4: each run completes or is told the queue is full, and the
    server answers a cheap request meanwhile."""
    import httpx

    monkeypatch.setenv("MMSPEC_QUEUE_SIZE", "4")
    demo = tiny_demo(tiny_dir, make_examples(tmp_path / "ex"))
    try:
        client = serve(demo)
        picture = tmp_path / "p.png"
        tiny_models.image(7, size=64).save(picture)
        outcomes: list[str] = []

        def one(i: int) -> None:
            try:  # predict, not iterating the job: a refused job never reports FINISHED to an iterator
                c = Client(client.src, verbose=False)
                res = c.predict(handle_file(str(picture)), "Describe.", str(tiny_dir / "llava"), "ngram", [], "chain",
                                2, 8, 2, 2, 0.0, 1.0, i, 4, 3, api_name="/run")
                outcomes.append(res[0])  # the status
            except Exception as e:  # noqa: BLE001
                outcomes.append(f"error: {e}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for th in threads:
            th.start()
        time.sleep(2.0)
        t0 = time.perf_counter()
        assert httpx.get(client.src.rstrip("/") + "/config", timeout=10).status_code == 200
        responsive_s = time.perf_counter() - t0
        deadline = time.monotonic() + 600
        for th in threads:
            th.join(timeout=max(0.0, deadline - time.monotonic()))
        done = [o for o in outcomes if o.startswith("✓ Done")]
        full = [o for o in outcomes if "queue is full" in o.lower()]
        print(f"{len(done)} done, {len(full)} told the queue is full; /config answered in {responsive_s:.2f} s")
        assert len(outcomes) == 16 and len(done) + len(full) == 16, outcomes
        assert done and responsive_s < 5.0
    finally:
        demo.close()


@pytest.mark.slow
def test_memory_flat_over_fifty_runs(served, tmp_path):
    client, tiny, _ = served
    picture = tmp_path / "p.png"
    tiny_models.image(8, size=64).save(picture)
    rss = []
    for i in range(50):
        _, res = run(client, handle_file(str(picture)), target=str(tiny / "llava"), drafter="ngram", max_tokens=2,
                     seed=i)
        assert res[STATUS].startswith("✓ Done"), res[STATUS]
        if i in (4, 49):
            rss.append(settle())
    print(f"RSS after 5 runs {rss[0]:.0f} MB, after 50 {rss[1]:.0f} MB")
    assert rss[1] <= rss[0] * 1.10


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    examples = make_examples(tmp_path_factory.mktemp("examples"))
    demo = tiny_demo(tiny_dir, examples)
    yield serve(demo), tiny_dir, examples
    demo.close()


def test_unknown_session_stop_adds_nothing(served):
    """5000 /stop calls with invented session ids left the old stop table 5000 entries larger."""
    client, _, _ = served
    for i in range(300):
        client.session_hash = f"fresh-{i}"
        client.predict(api_name="/stop")  # answers nothing; stops nothing
    assert len(app.RUNS) == 0


def test_replays_one_at_a_time_per_session(served, tmp_path):
    """20 replays fired at once from one session: one plays, the rest are turned away at once (60 of
    them used to play together and slow every other visitor down)."""
    client, tiny, examples = served
    _, res = run(client, handle_file(str(examples / "noise.png")), target=str(tiny / "llava"), drafter="ngram",
                 max_tokens=8, seed=5)
    assert res[STATUS].startswith("✓")
    time.sleep(2.5)  # the race after the run ends (race_max_s = 2)
    jobs = [client.submit(api_name="/replay_race") for _ in range(20)]
    for job in jobs:
        job.result()
    frames = [len(job.outputs()) for job in jobs]
    played = [n for n in frames if n > 1]
    print(f"frames per replay: {frames}")
    assert 1 <= len(played) <= 3 and frames.count(1) >= 15, frames
