"""The page in a real headless Chromium (playwright, Debian's /usr/bin/chromium).

Loads the app on tiny models, picks the example, runs, waits for the race to finish, checks the
coloured tokens and the plotly tree, toggles rejected tokens, and saves screenshots as artifacts:
to $MMSPEC_SCREENSHOT (or tmp_path) and to tests/artifacts/ (git-ignored).

`test_embedded_default_screenshot` runs only when the embedded default model exists; it makes the
README screenshot:  MMSPEC_SCREENSHOT=assets/screenshot.png python -m pytest tests/test_browser.py -k embedded
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Waits are generous: on a busy 2-core CI machine a page or a tiny-model run can take far longer than
# on an idle one, and a tight wait there fails the suite for nothing.
WAIT_MS = 120_000
RUN_MS = 300_000

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (install Debian's chromium to run the browser test)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright python package is not installed")
sync_api.expect.set_options(timeout=WAIT_MS)

import app  # noqa: E402
from test_app import free_port, make_examples, tiny_demo  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*:Warning:gradio"), pytest.mark.slow]


def save_artifact(page, name: str, tmp_path: Path, env_path: str | None = None, full_page: bool = True) -> Path:
    target = Path(env_path) if env_path else tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), full_page=full_page)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    if target.resolve() != (ARTIFACTS / name).resolve():
        shutil.copyfile(target, ARTIFACTS / name)
    return target


@pytest.fixture()
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def serve(demo):
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


def run_example(page, url: str, timeout_ms: int, tree: bool = False) -> None:
    expect = sync_api.expect
    page.goto(url, timeout=WAIT_MS)
    page.wait_for_selector("#mmspec-run", timeout=WAIT_MS)
    page.locator("[data-testid=dataset-cell-0-0]").first.click()  # the first example (image + prompt)
    expect(page.locator("img").first).to_be_visible()
    if tree:
        page.locator("label:has-text('tree (dynamic)')").click()
    page.locator("#mmspec-run").click()
    expect(page.locator("#mmspec-status")).to_contain_text("Done", timeout=timeout_ms)
    expect(page.locator("#mmspec-clock")).to_contain_text("race finished", timeout=timeout_ms)


def pick(page, elem_id: str, text: str) -> None:
    """Type into a (multiselect) dropdown and take the first matching choice."""
    box = page.locator(f"#{elem_id} input").first
    box.fill(text)
    box.press("Enter")
    page.keyboard.press("Escape")


def test_page_runs_and_draws(tiny_dir, tmp_path, browser):
    examples = make_examples(tmp_path / "examples")
    demo = tiny_demo(tiny_dir, examples)
    try:
        url = serve(demo)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        expect = sync_api.expect
        # the target's own weights as the drafter: accepted tokens and bonus tokens; then a tree shape
        run_example(page, url, timeout_ms=RUN_MS)
        spec = page.locator("#mmspec-pane-1 .tok")
        expect(spec.first).to_be_visible()
        assert page.locator("#mmspec-pane-1 .tok-accepted").count() > 0
        assert page.locator("#mmspec-pane-0 .tok").count() > 0
        page.get_by_role("tab", name="Step inspector").click()
        expect(page.locator("#mmspec-tree .js-plotly-plot")).to_be_visible()
        expect(page.locator("#mmspec-pane-1")).to_contain_text("speed-up")
        title = page.locator("#mmspec-pane-1 .tok-accepted").first.get_attribute("title")
        assert "draft q = " in title and "min(1, p/q)" in title

        # the random drafter as a dynamic tree: rejections and corrections, hidden until asked for
        drafter = page.locator("#mmspec-drafter input").first
        drafter.fill("random")
        drafter.press("Enter")
        page.locator("label:has-text('tree (dynamic)')").click()
        page.locator("#mmspec-run").click()
        random_done = re.compile(r"random \(worst case\): τ 1\.\d\d")  # a random guess is accepted now and then
        expect(page.locator("#mmspec-status")).to_contain_text(random_done, timeout=RUN_MS)
        expect(page.locator("#mmspec-clock")).to_contain_text("race finished", timeout=RUN_MS)
        rejected = page.locator("#mmspec-pane-1 .tok-rejected")
        assert rejected.count() > 0
        expect(rejected.first).to_be_hidden()
        page.locator("label:has-text('show rejected drafts')").click()
        expect(rejected.first).to_be_visible()
        assert page.locator("#mmspec-pane-1 .tok-correction").count() > 0
        save_artifact(page, "browser-tiny.png", tmp_path, os.environ.get("MMSPEC_SCREENSHOT"))

        page.locator("#mmspec-prompt textarea").fill("")
        page.locator("#mmspec-run").click()
        expect(page.locator("#mmspec-status")).to_contain_text("prompt is empty", timeout=WAIT_MS)

        # the saved benchmark figures: drawn by plotly, the projection captioned as one
        page.get_by_role("tab", name="Benchmarks").click()
        expect(page.get_by_text("Projection, not a measurement")).to_be_visible()
        expect(page.locator("#mmspec-bench .js-plotly-plot").first).to_be_visible(timeout=WAIT_MS)
        assert page.locator("#mmspec-bench .js-plotly-plot").count() >= 2
        save_artifact(page, "browser-benchmarks.png", tmp_path)
        assert not errors, errors
    finally:
        demo.close()


TABS = ("Race numbers", "Step inspector", "Vanilla vs speculative", "Internals", "Session runs", "Benchmarks", "Trace")


def small_png(path: Path) -> None:
    """128 colours: a page screenshot stays a few tens of KB (the repository must stay small)."""
    from PIL import Image

    with Image.open(path) as im:
        im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


@pytest.mark.skipif(not (ROOT / "assets" / "models" / "mmspec-target").exists(),
                    reason="the embedded default model (assets/models/mmspec-target) is not built yet")
def test_embedded_default_screenshot(tmp_path, browser):
    """The README's screenshots: the embedded default with three drafters racing, then every tab.
    MMSPEC_SCREENSHOT=assets/screenshot.png also writes assets/screenshot-<tab>.png."""
    demo = app.build_demo()  # no configuration: the embedded default, as `python app.py` starts it
    try:
        url = serve(demo)
        page = browser.new_page(viewport={"width": 1400, "height": 1100}, device_scale_factor=1)
        page.goto(url, timeout=WAIT_MS)
        page.wait_for_selector("#mmspec-run", timeout=WAIT_MS)
        page.locator("[data-testid=dataset-cell-0-0]").first.click()
        cfg = app.make_config(cache_examples=False)
        default = next(label for label, spec in cfg.drafters if spec == cfg.default_drafter)
        for choice in [c for c in ("draft VLM", "text-only LM", "vispec") if c not in default][:2]:
            pick(page, "mmspec-rivals", choice)  # the measured default races two others
        page.locator("#mmspec-run").click()
        sync_api.expect(page.locator("#mmspec-status")).to_contain_text("Done", timeout=RUN_MS)
        sync_api.expect(page.locator("#mmspec-clock")).to_contain_text("race finished", timeout=RUN_MS)
        assert page.locator("#mmspec-pane-1 .tok").count() > 0 and page.locator("#mmspec-pane-3 .tok").count() > 0
        main = Path(os.environ.get("MMSPEC_SCREENSHOT") or tmp_path / "screenshot.png")
        save_artifact(page, "screenshot-embedded.png", tmp_path, str(main), full_page=True)
        small_png(main)
        for tab in TABS:
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(800)  # plots redraw at the tab's width
            if tab == "Step inspector":  # the default's long chain is wider than the page: it scrolls, not clips
                wide, overflow = page.locator("#mmspec-tree").evaluate(
                    "e => [e.scrollWidth > e.clientWidth, getComputedStyle(e).overflowX]")
                assert not wide or overflow in ("auto", "scroll"), overflow
            shot = main.with_name(f"{main.stem}-{tab.split()[0].lower()}.png")
            box = page.evaluate("""() => { const r = document.querySelector('#mmspec-tabs').getBoundingClientRect();
                return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: Math.min(r.height, 1000)}; }""")
            page.screenshot(path=str(shot), full_page=True, clip=box)  # page coordinates, at most 1000 px tall
            small_png(shot)
    finally:
        demo.close()


def test_crafted_traces_run_no_script(tiny_dir, tmp_path, browser):
    """Traces with a script payload in every text field (and, refused, in numeric ones) replayed in the page:
    nothing runs, no element is injected, and the payload shows as text (escaped once, not twice)."""
    import crafted

    race = crafted.diverged(crafted.real_race(tiny_dir))
    cases = [(crafted.write(tmp_path / f"poisoned-{i}.json", crafted.poisoned(race, p)), p)
             for i, p in enumerate(crafted.PAYLOADS)]
    numeric = crafted.poisoned(race, crafted.PAYLOADS[0])
    numeric["speculative"]["steps"][1]["tree"]["depths"][0] = crafted.PAYLOADS[0]
    numeric["vanilla"]["steps"][1]["index"] = crafted.PAYLOADS[0]
    numeric["vanilla"]["token_ids"][0] = crafted.PAYLOADS[0]
    cases.append((crafted.write(tmp_path / "numeric.json", numeric), None))  # refused: nothing drawn
    demo = tiny_demo(tiny_dir, make_examples(tmp_path / "examples"))
    expect = sync_api.expect
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        url = serve(demo)
        for path, payload in cases:
            page.goto(url)  # a fresh page: the upload box holds one file
            page.wait_for_selector("#mmspec-run", timeout=30_000)
            page.get_by_role("tab", name="Trace").click()
            page.locator("#mmspec-trace-upload input[type=file]").set_input_files(str(path))
            expect(page.locator("#mmspec-status")).to_contain_text("Trace loaded" if payload else "malformed",
                                                                   timeout=60_000)
            for tab in ("Race numbers", "Step inspector", "Vanilla vs speculative", "Internals", "Session runs"):
                page.get_by_role("tab", name=tab).click()
                page.wait_for_timeout(300)
            if payload:
                expect(page.locator(".mmspec-diff")).to_contain_text("differs at token")
                expect(page.locator("#mmspec-clock")).to_contain_text("race finished", timeout=60_000)
                page.locator("#mmspec-pane-1 .tok").first.hover()
                spec_text = page.locator("#mmspec-pane-1").inner_text()
                assert payload in spec_text and "&lt;" not in spec_text  # shown as text, escaped exactly once
            page.wait_for_timeout(500)
            injected = page.evaluate("""() => ({
                flag: window.__mmspec_xss === undefined ? null : window.__mmspec_xss,
                handlers: document.querySelectorAll('[onerror],[onload]').length,
                imgs: document.querySelectorAll('img[src="x"]').length,
                scripts: [...document.scripts].filter(s => s.text.includes('__mmspec_xss')).length,
            })""")
            assert injected == {"flag": None, "handlers": 0, "imgs": 0, "scripts": 0}, (path.name, injected)
        assert not dialogs
    finally:
        demo.close()


@pytest.mark.slow
def test_closing_the_tab_releases_the_session(tiny_dir, tmp_path, browser):
    """demo.unload: the session's trace file and its state go when its tab closes."""
    import time

    import crafted

    trace = crafted.write(tmp_path / "race.json", crafted.real_race(tiny_dir))
    demo = tiny_demo(tiny_dir, make_examples(tmp_path / "examples"))
    try:
        page = browser.new_page()
        page.goto(serve(demo))
        page.wait_for_selector("#mmspec-run", timeout=30_000)
        before = set(app.TRACE_DIR.iterdir())
        page.get_by_role("tab", name="Trace").click()
        page.locator("#mmspec-trace-upload input[type=file]").set_input_files(str(trace))
        sync_api.expect(page.locator("#mmspec-status")).to_contain_text("Trace loaded", timeout=60_000)
        made = set(app.TRACE_DIR.iterdir()) - before
        sessions = [s for s, st in demo.state_holder.session_data.items() if st.state_data]
        assert len(made) == 1 and len(sessions) == 1
        page.close()
        deadline = time.monotonic() + 90  # Gradio notices a closed tab at its next heartbeat
        while time.monotonic() < deadline and (made & set(app.TRACE_DIR.iterdir())):
            time.sleep(1)
        assert not made & set(app.TRACE_DIR.iterdir())
        assert not demo.state_holder.session_data[sessions[0]].state_data
    finally:
        demo.close()


# ------------------------------------------------------------------ on stage (issue 17)

LITERALS_JS = """() => { const t = document.body.innerText;
    return ['&#', '&lt;', '&gt;', '&amp;', '</s>'].filter(s => t.includes(s)); }"""
ERRORS_JS = """() => [...document.querySelectorAll('.error, [data-testid=toast-body]')]
    .filter(e => e.offsetParent !== null && /error/i.test(e.innerText)).map(e => e.innerText.slice(0, 80))"""
COUNTS_JS = """() => [0, 1, 2, 3].map(i => document.querySelectorAll(
    `#mmspec-pane-${i} .tok:not(.tok-rejected)`).length)"""
# Every pane state the page shows, recorded in the page as it changes: polling from Python misses
# frames when the machine is busy.
WATCH_COUNTS_JS = """() => { window.mmspecCounts = []; new MutationObserver(() => {
    const now = (""" + COUNTS_JS + """)(); const last = window.mmspecCounts[window.mmspecCounts.length - 1];
    if (!last || now.some((n, i) => n !== last[i])) window.mmspecCounts.push(now); })
    .observe(document.body, {childList: true, subtree: true, characterData: true}); }"""
WIDTH_JS = """(sel) => { const box = document.querySelector(sel); const svg = box && box.querySelector('svg.main-svg');
    return svg ? [svg.getBoundingClientRect().width, box.getBoundingClientRect().width] : null; }"""


def plot_fills(page, elem_id: str) -> None:
    """The plot's drawing is as wide as its container (not squeezed by being drawn in a hidden tab)."""
    sel = f"#{elem_id}"
    sync_api.expect(page.locator(f"{sel} svg.main-svg").first).to_be_visible()
    page.wait_for_timeout(400)  # the resize after a tab switch
    drawn, box = page.evaluate(WIDTH_JS, sel)
    assert box > 300 and drawn >= 0.9 * box, (elem_id, drawn, box)


def test_stage_race_stop_scope_and_replay(tiny_dir, tmp_path, browser, monkeypatch):
    """What a lecturer does on stage: three drafters race vanilla (the panes fill in several snapshots,
    then carry their medians and spreads); plots are full width after switching tabs; Stop mid-run ends
    cleanly; an out-of-world question is flagged; a replayed trace restores its image and prompt. No
    escaped entity or </s> is ever shown as text, and no error badge appears."""
    import crafted
    import webui.live

    expect = sync_api.expect
    # a race of 4-6 s: long enough to watch the panes fill
    demo = tiny_demo(tiny_dir, make_examples(tmp_path / "examples"), world_scope=True, race_min_s=4.0, race_max_s=6.0)
    try:
        url = serve(demo)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url, timeout=WAIT_MS)
        page.wait_for_selector("#mmspec-run", timeout=WAIT_MS)
        page.locator("[data-testid=dataset-cell-0-0]").first.click()
        pick(page, "mmspec-rivals", "tiny draft VLM")
        pick(page, "mmspec-rivals", "n-gram")
        page.get_by_role("tab", name="Trace").click()  # a run that ends while another tab is open
        page.evaluate(WATCH_COUNTS_JS)
        page.locator("#mmspec-run").click()
        expect(page.locator("#mmspec-clock")).to_contain_text("race finished", timeout=RUN_MS)
        snapshots = page.evaluate("() => window.mmspecCounts")
        final = page.evaluate(COUNTS_JS)
        growing = sorted({sum(s) for s in snapshots} - {sum(final), 0})  # the race's frames before the end
        assert len(growing) >= 3 and all(n > 0 for n in final), (snapshots, final)
        for i in range(4):
            expect(page.locator(f"#mmspec-pane-{i}")).to_contain_text("tok/s median")
        expect(page.locator("#mmspec-numbers")).to_contain_text("cpu, float32")
        save_artifact(page, "stage-race.png", tmp_path)
        for tab, plot in (("Race numbers", "mmspec-overlay"), ("Internals", "mmspec-entropy")):
            page.get_by_role("tab", name=tab).click()
            plot_fills(page, plot)
        expect(page.locator("#mmspec-layer-note")).to_contain_text("Layer choice rule")
        assert page.evaluate(LITERALS_JS) == []

        # Stop mid-run: the decode is slowed in this process so that the click lands while measuring
        class Slow(webui.live.Decoder):
            def __iter__(self):
                for s in super().__iter__():
                    page_pause(0.1)
                    yield s

        monkeypatch.setattr(webui.live, "Decoder", Slow)
        page.locator("#mmspec-prompt textarea").fill("Describe the picture.")  # not the stored example run
        page.locator("#mmspec-run").click()
        expect(page.locator("#mmspec-status")).to_contain_text("Measuring", timeout=60_000)
        page.wait_for_timeout(600)
        page.locator("#mmspec-stop").click()
        expect(page.locator("#mmspec-status")).to_contain_text("Stopped after", timeout=60_000)
        page.wait_for_timeout(800)
        assert page.evaluate(ERRORS_JS) == []
        race_text = page.locator("#mmspec-race").inner_text()
        assert "measuring" not in race_text and "waiting" not in race_text and "stopped" in race_text
        assert page.locator("#mmspec-pane-0 .tok").count() > 0  # what was produced stays
        monkeypatch.undo()

        # out of the target's world: said before anything runs
        page.locator("#mmspec-prompt textarea").fill("What is the capital of France?")
        expect(page.locator("#mmspec-scope")).to_contain_text("Outside the embedded target's world")
        page.locator("#mmspec-prompt textarea").fill("How many red circles are there?")
        expect(page.locator("#mmspec-scope")).not_to_contain_text("Outside")

        # a replayed trace brings back its image, prompt and settings
        race = crafted.real_race(tiny_dir)
        race["speculative"]["prompt"] = race["vanilla"]["prompt"] = "Where is the <small> triangle?"
        trace = crafted.write(tmp_path / "replay.json", race)
        page.get_by_role("tab", name="Trace").click()
        page.locator("#mmspec-trace-upload input[type=file]").set_input_files(str(trace))
        expect(page.locator("#mmspec-status")).to_contain_text("Trace loaded", timeout=60_000)
        expect(page.locator("#mmspec-prompt textarea")).to_have_value("Where is the <small> triangle?")
        expect(page.locator("#mmspec-image img").first).to_be_visible()
        expect(page.locator("label:has-text('tree (dynamic)') input")).to_be_checked()
        expect(page.locator("#mmspec-clock")).to_contain_text("race finished", timeout=60_000)
        assert page.evaluate(LITERALS_JS) == [] and page.evaluate(ERRORS_JS) == []
        save_artifact(page, "stage-replay.png", tmp_path)
        assert not errors, errors
    finally:
        demo.close()


def page_pause(seconds: float) -> None:
    import time

    time.sleep(seconds)
