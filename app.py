"""mmspec's Gradio app: layout and event wiring only (the Spaces entry file).

    python app.py                                  # embedded default model, http://127.0.0.1:7860
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7861 python app.py

Configuration (all optional): MMSPEC_TARGET (model dir or hub id), MMSPEC_DRAFTERS (comma-separated
model dirs / hub ids added to the drafter list), MMSPEC_EXAMPLES (a folder with examples.json),
MMSPEC_MAX_NEW_TOKENS (UI limit), MMSPEC_QUEUE_SIZE; MMSPEC_PUBLIC=1 (or a Space's SPACE_ID) turns on
public mode (webui/policy.py: listed models only, tighter limits, MMSPEC_PUBLIC_PAIRS).
Tests call `build_demo(...)` with tiny models instead.

What lives where: the measurement protocol, live decoding, request parsing and the model cache are in
webui/ (Gradio-free, shared with the benchmarks); figures and HTML in viz/. Vanilla and up to three
drafters are measured apart (a warm-up, then rounds of timed runs, each number a median with its
spread), and the race then replays their median runs on one slowed clock.
Outputs are declared once (`OUTPUTS`), and `demo.mmspec_api[event]` lists an API event's outputs by
name, in order, for clients and tests.
"""
from __future__ import annotations

import html
import logging
import math
import os
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from mmspec import InputError
from mmspec.defaults import default_method
from mmspec.drafters import registry
from mmspec.load import ASSETS, DEFAULT_TARGET
from mmspec.tree import TreeSpec, parse_tree_spec
from viz import bench, card, charts, numbers, race, tokens, traceio
from viz.race import RACE_CSS
from viz.style import CSS
from webui import measure, views
from webui.live import MAX_DRAFTERS, measure_live
from webui.views import short_name
from webui.policy import Limits, make_policy, public_mode
from webui.request import (SHAPE_LIMITS, Rules, hash_file, inside, parse_request, read_examples, shape_fits,
                           trace_settings)
from webui.session import (ModelCache, RateLimiter, RunCache, RunRegistry, SessionFiles, release_memory,
                           remove_file)

try:  # Hugging Face ZeroGPU; optional
    import spaces  # type: ignore
except ImportError:  # pragma: no cover - depends on the host
    spaces = None

log = logging.getLogger("mmspec.app")

MODELS_DIR = ASSETS / "models"
DEFAULT_EXAMPLES = ASSETS / "examples"
TRACE_DIR = Path(tempfile.mkdtemp(prefix="mmspec-traces-"))
SPEEDS = [("½×", 0.5), ("1×", 1.0), ("2×", 2.0), ("4×", 4.0)]
# Plotly redraws at its container's width on a window resize: a tab shown after its plots were drawn
# in a hidden (zero-width) container gets one, so no figure stays squeezed.
RESIZE_JS = "() => { setTimeout(() => window.dispatchEvent(new Event('resize')), 80); }"
PAGE_CSS = CSS + RACE_CSS + """
.mmspec-card-table { border-collapse: collapse; font-size: 13px; margin: 4px 0 8px; }
.mmspec-card-table th, .mmspec-card-table td { border: 1px solid var(--border-color-primary); padding: 2px 8px;
  text-align: left; vertical-align: top; }
.mmspec-card { font-size: 14px; color: var(--body-text-color); }
#mmspec-tree { overflow-x: auto !important; }  /* Gradio sets overflow: hidden inline; a long chain scrolls */
"""


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def default_token_limit() -> int:
    env = os.environ.get("MMSPEC_MAX_NEW_TOKENS")
    if env:
        return max(1, int(env))
    return 1024 if _cuda() else 512


def reachable(model: str) -> bool:
    """A hub id is offered only when the hub can be reached (HF_HUB_OFFLINE unset); a directory when it exists."""
    if Path(model).expanduser().exists():
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes")


# ---------------------------------------------------------------------------- models (module scope, cached)

MODELS = ModelCache()
RUNS = RunRegistry()  # stop flags of the runs and races in progress
RUN_CACHE = RunCache()  # example runs already measured


def gpu(duration: int = 180):
    """`spaces.GPU(duration=...)` on Hugging Face ZeroGPU, a no-op elsewhere."""
    if spaces is not None and hasattr(spaces, "GPU"):
        return spaces.GPU(duration=duration)
    return lambda fn: fn


@gpu(duration=300)
def measure_runs(req, drafters, labels, stop, every_s):
    """webui.live.measure_live on the GPU (ZeroGPU runs this in another process; events are picklable)."""
    yield from measure_live(MODELS, req, drafters, labels, stop, req.repeats, every_s)


# ---------------------------------------------------------------------------- configuration

@dataclass
class AppConfig:
    default_target: str | None
    target_missing: bool
    drafters: list[tuple[str, str]]
    default_drafter: str
    examples: list[tuple[str, str]]  # (image path, prompt)
    example_hashes: set[str]
    token_limit: int
    public: bool
    rules: Rules  # limits, allowed models, upload folder, example paths (webui.request)
    race_min_s: float
    race_max_s: float
    fps: float
    live_every_s: float
    cache_examples: bool
    default_tree: TreeSpec  # the shape the controls start at
    world_scope: bool  # warn about questions and pictures outside the embedded target's world


def _drafter_list(drafters: list | None) -> list[tuple[str, str]]:
    """The drafter menu, (label, spec): the registry's shipped drafters plus MMSPEC_DRAFTERS, or the
    configured list; the model-free drafters always end it."""
    if drafters is None:
        extra = [(e.strip(), e.strip()) for e in (os.environ.get("MMSPEC_DRAFTERS") or "").split(",") if e.strip()]
        return registry.choices(MODELS_DIR, extra)
    return registry.choices(None, [tuple(d) if isinstance(d, (tuple, list)) else (str(d), str(d)) for d in drafters])


def make_config(default_target=None, drafters=None, default_drafter=None, examples_dir=None, max_new_tokens_limit=None,
                race_min_s=8.0, race_max_s=20.0, fps=10.0, live_every_s=0.4, cache_examples=True,
                public: bool | None = None, world_scope: bool | None = None) -> AppConfig:
    target = default_target or os.environ.get("MMSPEC_TARGET") or str(DEFAULT_TARGET)
    missing = not (Path(target).exists() or ("/" in target and not target.startswith((".", "/", "~"))))
    dlist = _drafter_list(drafters)
    values = [v for _, v in dlist]
    # Without a choice: the fastest method measured on a GPU for the embedded target (bench/speed.py).
    measured = default_method() if target == str(DEFAULT_TARGET) else None
    if default_drafter in values:
        dd, default_tree = default_drafter, "chain:4"
    elif measured is not None and measured.drafter in values:
        dd, default_tree = measured.drafter, measured.tree
        if not shape_fits(parse_tree_spec(default_tree)):  # a bench record may outgrow the sliders
            log.warning("the measured default shape %s is beyond the app's shape controls %s; starting at chain:4",
                        default_tree, SHAPE_LIMITS)
            default_tree = "chain:4"
    else:
        dd, default_tree = values[0], "chain:4"
    ex_dir = Path(examples_dir) if examples_dir else Path(os.environ.get("MMSPEC_EXAMPLES") or DEFAULT_EXAMPLES)
    examples = read_examples(ex_dir)
    hashes = set()
    for path, _ in examples:
        try:
            hashes.add(hash_file(path))
        except OSError:
            pass
    public = public_mode() if public is None else public
    token_limit = int(max_new_tokens_limit or default_token_limit())
    limits = Limits.public(min(token_limit, 256)) if public else Limits(max_new_tokens=token_limit)
    policy = make_policy(public, str(target), values)
    if public:  # the curated hub drafters join the list (offline: only those on disk, the menu is not broken)
        dlist += [(f"{short_name(d)} (hub)", d) for d in policy.drafters() if d not in values and reachable(d)]
    limits = Limits(**{**vars(limits), "queue_size": int(os.environ.get("MMSPEC_QUEUE_SIZE", limits.queue_size))})
    rules = Rules(limits, policy, get_upload_folder(), frozenset(os.path.realpath(p) for p, _ in examples))
    return AppConfig(str(target), missing, dlist, dd, examples, hashes, limits.max_new_tokens, public, rules,
                     float(race_min_s), float(race_max_s), float(fps), float(live_every_s), bool(cache_examples),
                     parse_tree_spec(default_tree),
                     target == str(DEFAULT_TARGET) if world_scope is None else world_scope)


# ---------------------------------------------------------------------------- outputs, declared once

RACE_OUT = ["clock", *(f"pane{i}" for i in range(views.PANES))]
VIEW_OUT = ["legend", "numbers", "overlay_plot", "spread_plot", "measurements", "step_slider", "tree_plot",
            "step_info", "depth_plot", "hist_plot", "diff_box", "van_text", "spec_text", "entropy_plot", "layer_note",
            "card_box", "accept_box", "vmap_plot", "summary_df", "summary_plot", "trace_file"]
STATES = ["bundle_state", "race_go", "runs_state"]
RUN_OUT = ["status", "scope", *RACE_OUT, *VIEW_OUT, *STATES]
SETTINGS = ["image", "prompt", "drafter", "rivals", "shape", "chain_len", "budget", "depth", "topk", "temperature",
            "top_p", "seed", "max_tokens"]
OUTPUTS = {"run": RUN_OUT, "load_trace": RUN_OUT + SETTINGS, "replay_race": RACE_OUT,
           "inspect_step": ["tree_plot", "step_info", "vmap_plot"]}


def api_outputs(event: str) -> list[str]:
    """The names of an API event's outputs, in the order a client receives them (gr.State is not sent)."""
    return [n for n in OUTPUTS[event] if n not in STATES]


def _gradio(value):
    if isinstance(value, views.Update):
        return gr.update(**value.props) if value.props else gr.skip()
    return value


class UI:
    """Handles on the components, filled by build_demo; `out(name=value, ...)` is an update dict."""

    def __getattr__(self, name):  # pragma: no cover - a typo in wiring should fail loudly
        raise AttributeError(name)

    def out(self, **values) -> dict:
        """Values by output name as Gradio wants them (a webui.views.Update as a component update)."""
        return {getattr(self, k): _gradio(v) for k, v in values.items()}

    def comps(self, names: list[str]) -> list:
        return [getattr(self, n) for n in names]


def save_bundle(bundle: traceio.Bundle, files: SessionFiles | None = None, session: str = "default") -> str:
    """The bundle as a trace file; `files` keeps only the session's latest and removes it when it ends."""
    name = f"mmspec-trace-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}.json"
    path = traceio.save(bundle, TRACE_DIR / name)
    return str(files.add(session, path) if files is not None else path)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


# ---------------------------------------------------------------------------- the page

INTRO = ("## mmspec · lossless speculative decoding for vision-language models\n"
         "A drafter guesses several tokens; the target checks them all in one forward pass and keeps exactly what "
         "it would have produced on its own. Pick an image, a prompt and up to three drafters, then **Run**: each "
         "method is measured apart, then they **race** on one slowed clock.")


def _inputs(ui: UI, cfg: AppConfig, default_max_new_tokens: int) -> None:
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=300):
            ui.image = gr.Image(label="Image", type="filepath", image_mode=None, height=240,
                                sources=["upload", "clipboard"], elem_id="mmspec-image")
            first_prompt = cfg.examples[0][1] if cfg.examples else "Describe the image."
            ui.prompt = gr.Textbox(first_prompt, label="Prompt", elem_id="mmspec-prompt", lines=2, max_lines=6)
            ui.scope = gr.HTML("", elem_id="mmspec-scope")
            if cfg.examples:
                gr.Examples(examples=[[p, q] for p, q in cfg.examples], inputs=[ui.image, ui.prompt],
                            label="Examples (click one, then Run)", examples_per_page=8)
        with gr.Column(scale=6, min_width=320):
            _model_controls(ui, cfg)
            _shape_controls(ui, cfg, default_max_new_tokens)
            with gr.Row():
                ui.run_btn = gr.Button("Run", variant="primary", elem_id="mmspec-run")
                ui.stop_btn = gr.Button("Stop", variant="stop", elem_id="mmspec-stop")


def _model_controls(ui: UI, cfg: AppConfig) -> None:
    target_choices = [(f"{short_name(cfg.default_target)} (default)", cfg.default_target)]
    if cfg.public:  # hub targets only where the hub is reachable: offline the menu is hidden, not broken
        target_choices += [(f"{t} (hub)", t) for t in cfg.rules.policy.targets
                           if t != cfg.default_target and reachable(t)]
    ui.target = gr.Dropdown(target_choices, value=cfg.default_target, allow_custom_value=not cfg.public,
                            label="Target model", elem_id="mmspec-target", visible=len(target_choices) > 1 or
                            not cfg.public, info="the models this public app offers" if cfg.public else
                            "embedded default, a hub id or a local directory")
    ui.drafter = gr.Dropdown(cfg.drafters, value=cfg.default_drafter, allow_custom_value=not cfg.public,
                             label="Drafter", elem_id="mmspec-drafter",
                             info="vanilla is always measured as the baseline" +
                             ("" if cfg.public else "; a path or hub id works too"))
    ui.rivals = gr.Dropdown(cfg.drafters, value=[], multiselect=True, max_choices=MAX_DRAFTERS - 1,
                            label=f"Race against (up to {MAX_DRAFTERS - 1} more drafters)", elem_id="mmspec-rivals")


def _shape_controls(ui: UI, cfg: AppConfig, default_max_new_tokens: int) -> None:
    t0 = cfg.default_tree
    tree0 = t0.kind == "dynamic"
    ui.shape = gr.Radio(["chain", "tree (dynamic)"], value="tree (dynamic)" if tree0 else "chain", label="Draft shape")
    with gr.Row(visible=not tree0) as ui.chain_row:
        ui.chain_len = gr.Slider(*SHAPE_LIMITS["chain_len"], value=t0.depth if t0.kind == "chain" else 4, step=1,
                                 label="chain length")
    with gr.Row(visible=tree0) as ui.tree_row:
        ui.budget = gr.Slider(*SHAPE_LIMITS["budget"], value=t0.budget if tree0 else 16, step=1,
                              label="budget (nodes)")
        ui.depth = gr.Slider(*SHAPE_LIMITS["depth"], value=t0.depth if tree0 else 4, step=1, label="depth")
        ui.topk = gr.Slider(*SHAPE_LIMITS["topk"], value=t0.topk if tree0 else 3, step=1, label="top-k")
    with gr.Row():
        ui.max_tokens = gr.Slider(1, cfg.token_limit, value=min(default_max_new_tokens, cfg.token_limit), step=1,
                                  label="max new tokens")
        ui.repeats = gr.Slider(measure.MIN_REPEATS, 10, value=measure.MIN_REPEATS, step=1,
                               label="timed runs per method (after a warm-up)")
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            ui.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
            ui.top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
            ui.seed = gr.Number(value=0, precision=0, minimum=0, label="seed")


def _race_area(ui: UI) -> None:
    ui.clock = gr.HTML(views.clock_note("The race starts once every run is measured."), elem_id="mmspec-clock")
    with gr.Row():
        ui.speed = gr.Radio(SPEEDS, value=1.0, label="race speed", elem_id="mmspec-speed", scale=3)
        ui.replay_btn = gr.Button("Replay race", size="sm", scale=1, elem_id="mmspec-replay")
        ui.show_rejected = gr.Checkbox(False, label="show rejected drafts (struck through)", scale=2)
    with gr.Row(equal_height=False, elem_id="mmspec-race"):
        for i in range(views.PANES):
            setattr(ui, f"pane{i}", gr.HTML("", elem_id=f"mmspec-pane-{i}", visible=i < 2, min_height=120))
    ui.legend = gr.HTML(tokens.legend_html(), elem_id="mmspec-legend")
    ui.numbers = gr.HTML(numbers.table_html([]), elem_id="mmspec-numbers")
    gr.HTML(numbers.notes_html(measure.PROTOCOL_NOTE, measure.TAU_DOC, "Verdict rule: " + measure.VERDICT_DOC,
                               "On a CPU shared with other work, timings move from run to run; τ does not."))
    with gr.Accordion("the numbers as JSON (for scripts and the API)", open=False):
        ui.measurements = gr.JSON(label="measurements: median and spread of every timing", elem_id="mmspec-json")


def _tabs(ui: UI, session_device: str) -> list:
    tabs = []
    with gr.Tabs(elem_id="mmspec-tabs"):
        with gr.Tab("Race numbers") as t:
            with gr.Row():
                ui.overlay_plot = gr.Plot(label="acceptance by depth, every drafter", elem_id="mmspec-overlay")
                ui.spread_plot = gr.Plot(label="speed-up with its spread", elem_id="mmspec-spread")
        tabs.append(t)
        with gr.Tab("Step inspector") as t:
            ui.step_slider = gr.Slider(0, 1, value=0, step=1, label="step of the first drafter's run")
            ui.step_info = gr.Markdown("_No run yet._")
            # no label: the figure has its own title and is laid out in pixels (a label adds a top margin)
            ui.tree_plot = gr.Plot(label="draft tree", elem_id="mmspec-tree", show_label=False)
            with gr.Row():
                ui.depth_plot = gr.Plot(label="acceptance by depth")
                ui.hist_plot = gr.Plot(label="accepted length")
        tabs.append(t)
        with gr.Tab("Vanilla vs speculative") as t:
            ui.diff_box = gr.HTML('<div class="mmspec-diff">Run something to compare outputs.</div>')
            with gr.Row():
                ui.van_text = gr.Textbox(label="vanilla output", lines=4, interactive=False, buttons=["copy"])
                ui.spec_text = gr.Textbox(label="speculative output", lines=4, interactive=False, buttons=["copy"])
        tabs.append(t)
        with gr.Tab("Internals") as t:
            ui.entropy_plot = gr.Plot(label="the target's attention entropy per layer", elem_id="mmspec-entropy")
            ui.layer_note = gr.HTML("", elem_id="mmspec-layer-note")
            ui.vmap_plot = gr.Plot(visible=False, label="visual tokens")
            with gr.Row():
                ui.card_box = gr.HTML("", elem_id="mmspec-card")
                ui.accept_box = gr.HTML("", elem_id="mmspec-acceptance")
        tabs.append(t)
        with gr.Tab("Session runs") as t:
            ui.summary_df = gr.Dataframe(headers=charts.SUMMARY_HEADERS, value=[], interactive=False,
                                         label="runs in this browser session (medians of the timed runs)", wrap=True)
            ui.summary_plot = gr.Plot(label="speed-up per run")
        tabs.append(t)
        with gr.Tab("Benchmarks", elem_id="mmspec-bench") as t:
            _benchmarks(session_device)
        tabs.append(t)
        with gr.Tab("Trace") as t:
            gr.Markdown("Download the trace of the last run (every measured run that raced, every step), or upload "
                        "one to replay it here without any model: its image, prompt and settings come back too.")
            with gr.Row():
                ui.trace_file = gr.File(label="trace of the last run (JSON)", interactive=False)
                ui.trace_upload = gr.File(label="replay a trace", file_types=[".json"], type="filepath",
                                          elem_id="mmspec-trace-upload")
        tabs.append(t)
    return tabs


def _benchmarks(session_device: str) -> None:
    gr.Markdown("Saved results of the repository's benchmarks (not of your runs): one figure per question, each "
                "naming the hardware it was measured on and whether it applies to this session.")
    for rs in bench.best_result_sets(session_device):
        gr.Markdown(f"**Measured on {bench.hardware_name(rs.meta)}** ({rs.meta.get('dtype', '?')}, `{rs.name}.json`): "
                    f"{bench.applies_here(rs.meta, session_device)}.")
        gr.Plot(bench.tau_figure(rs.meta, rs.rows), label=f"τ on {bench.hardware_name(rs.meta)}")
        gr.Plot(bench.speedup_figure(rs.meta, rs.rows), label=f"speed-up on {bench.hardware_name(rs.meta)}")
    for saved in bench.saved_figures():
        if saved.name.startswith("scale"):
            gr.Markdown(saved.caption)
            gr.Plot(saved.figure, label=saved.name)


class Handlers:
    """The page's event handlers; each turns webui / viz results into updates of named outputs."""

    def __init__(self, ui: UI, cfg: AppConfig, demo: gr.Blocks):
        self.ui, self.cfg, self.demo = ui, cfg, demo
        self.pace = views.Pace(cfg.fps, cfg.race_min_s, cfg.race_max_s)
        limits = cfg.rules.limits
        # Cheap events, per session: one at a time and a few a minute, so one visitor cannot crowd others out.
        self.replays = RateLimiter(limits.replays_per_minute, limits.max_sessions)
        self.inspections = RateLimiter(limits.replays_per_minute * 20, limits.max_sessions)  # a slider drag sends many
        self.trace_loads = RateLimiter(limits.replays_per_minute, limits.max_sessions)
        self.files = SessionFiles(keep=1, max_sessions=limits.max_sessions)
        # by the name in the list and by its real path: a relative or linked path gets the same words
        self.labels = {**{os.path.realpath(v): label for label, v in cfg.drafters if Path(v).exists()},
                       **{v: label for label, v in cfg.drafters}}

    def fail(self, message: str) -> dict:
        gr.Warning(message)
        return self.ui.out(status=f"⚠ {html.escape(message)}", race_go=False)

    def label(self, name: str) -> str:
        real = os.path.realpath(name) if Path(name).exists() else name
        return self.labels.get(name) or self.labels.get(real) or short_name(name)

    # ---- measuring
    def measure(self, image, prompt, target, drafter, rivals, shape, chain_len, budget, depth, topk, temperature,
                top_p, seed, max_tokens, repeats, runs, request: gr.Request):
        session = _session(request)
        with RUNS.running(session) as stop:  # Stop sets this flag; the entry goes when the run ends
            try:
                req = parse_request(self.cfg.rules, image, prompt, target, drafter, shape, chain_len, budget, depth,
                                    topk, temperature, top_p, seed, max_tokens, rivals, repeats)
            except InputError as e:
                yield self.fail(str(e))
                return
            yield from self.measure_in(session, req, stop, runs)

    def measure_in(self, session, req, stop, runs):
        ui, cfg = self.ui, self.cfg
        note = f" ({req.note})" if req.note else ""
        scope = views.scope_html(req.prompt, req.image_path, cfg.rules.limits) if cfg.world_scope else ""
        key = req.cache_key() if cfg.cache_examples else None  # only the examples' runs are stored
        stored = RUN_CACHE.get(key)
        if stored is not None:
            yield {**self.finished(stored, runs, session, "cached"), **ui.out(scope=scope), **ui.out(
                status="✓ Example already measured in this app: replaying the stored runs (change any setting to "
                       "measure anew).")}
            return
        labels = ["vanilla", *(self.label(d) for d in req.drafters)]
        yield {**ui.out(status=f"Loading {html.escape(short_name(req.target))}…{note}", scope=scope, race_go=False,
                        clock=views.clock_note("Measuring… the race plays once every run is measured.", "measuring")),
               **self.waiting_panes(labels)}
        shown: dict[int, Any] = {}  # pane -> the last Live shown in it
        try:
            for event in measure_runs(req, req.drafters, labels, stop, cfg.live_every_s):
                if event[0] == "status":
                    yield ui.out(status=html.escape(event[1]) + note)
                elif event[0] == "live":
                    yield self.live_update(event[1], shown, note)
                elif event[0] == "stopped":
                    yield self.stopped(event[1], shown, labels)
                    return
                else:
                    result = event[1]
        except InputError as e:
            yield {**self.fail(str(e)), **self.settle(shown, "not measured", labels)}
            return
        except Exception as e:  # noqa: BLE001 - keep the app alive, say what happened
            log.error("run failed: %s", traceback.format_exc())
            yield {**self.fail(f"Unexpected error: {type(e).__name__}: {e}"),
                   **self.settle(shown, "not measured", labels)}
            return
        if key is not None and key[0] in cfg.example_hashes:
            RUN_CACHE.put(key, result.bundle)
        yield {**self.finished(result.bundle, runs, session), **ui.out(status=self.done_status(result.bundle, note))}

    def waiting_panes(self, labels: list[str]) -> dict:
        frame = race.Frame(0.0, 0.0, tuple(race.PaneFrame(label, (), 0.0, False, False) for label in labels))
        return self.ui.out(**views.panes(frame, state="waiting"))

    def live_update(self, live, shown: dict, note: str) -> dict:
        shown[live.method] = live
        frame = race.live_frame(live.label, live.steps, live.elapsed_s, live.eos_ids)
        status = (f"Measuring {html.escape(live.label)} on {html.escape(live.device)}: {live.what} · "
                  f"{live.tokens} tokens{note}")
        pane = getattr(self.ui, f"pane{live.method}")
        return {**self.ui.out(status=status),
                pane: gr.HTML(race.pane_html(frame, state=f"measuring ({live.what})…"), visible=True)}

    def settle(self, shown: dict, state: str, labels: list[str]) -> dict:
        """Every pane gets a final state (no stale 'measuring…' or 'waiting'); a pane that showed a run
        in progress keeps its tokens, one never reached says it was not measured."""
        out = {}
        for i, label in enumerate(labels):
            live = shown.get(i)
            frame = (race.live_frame(live.label, live.steps, live.elapsed_s, live.eos_ids) if live is not None
                     else race.PaneFrame(label, (), 0.0, False, False))
            out[getattr(self.ui, f"pane{i}")] = gr.HTML(race.pane_html(frame, state=state if live else "not measured"),
                                                        visible=True)
        return out

    def stopped(self, live, shown: dict, labels: list[str]) -> dict:
        n = live.tokens if live is not None else 0
        if live is not None:
            shown[live.method] = live  # its last step came after the last snapshot the page saw
        where = f" ({html.escape(live.label)}, {live.what})" if live is not None else ""
        return {**self.settle(shown, "stopped", labels), **self.ui.out(
            status=f"Stopped after {n} token{'' if n == 1 else 's'}{where}: nothing is compared, as not every run "
                   "was measured.",
            clock=views.clock_note("Stopped: no race (not every run was measured).", "stopped"), race_go=False)}

    def finished(self, bundle: traceio.Bundle, runs, session: str, source: str = "") -> dict:
        runs = views.session_rows(runs, bundle, source)
        return {**self.ui.out(**views.everything(bundle, self.pace, runs, save_bundle(bundle, self.files, session))),
                **self.ui.out(bundle_state=bundle, race_go=True, runs_state=runs)}

    def done_status(self, bundle: traceio.Bundle, note: str) -> str:
        van = bundle.vanilla
        same = all(tokens.first_divergence(van.token_ids, g.token_ids) is None for g in bundle.drafted)
        ms = bundle.measurements
        where = f"{ms[0]['device']}, {ms[0]['dtype']}" if ms else "?"
        verdicts = "; ".join(numbers.verdict_text(m) for m in ms[1:])
        return (f"✓ Done on {html.escape(where)} ({html.escape(bundle.speculative.config.get('tree', '?'))}): "
                f"{html.escape(verdicts)}; outputs {'identical' if same else 'differ (see the diff tab)'}.{note}")

    # ---- the race
    def replay(self, bundle, go=True, speed=1.0, request: gr.Request = None):
        if bundle is None or not go:  # nothing new to race: leave the panes as they are
            yield {c: gr.skip() for c in self.ui.comps(RACE_OUT)}
            return
        session = _session(request)
        with self.replays.slot(session) as ok:
            if not ok:
                gr.Warning("A replay is already playing, or too many replays this minute: wait a moment.")
                yield {c: gr.skip() for c in self.ui.comps(RACE_OUT)}
                return
            with RUNS.running(session) as stop:
                yield from self.race_frames(bundle, speed, stop)

    def race_frames(self, bundle: traceio.Bundle, speed, stop):
        try:
            speed = float(speed)
        except (TypeError, ValueError, OverflowError):
            speed = 1.0
        speed = min(max(speed, 0.25), 8.0) if math.isfinite(speed) else 1.0  # an API caller may send anything
        r = views.race_of(bundle, self.pace, speed)
        start, last = time.perf_counter(), None
        for frame in r.frames:
            wait = start + frame.clock_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if stop.is_set():
                break
            counts = tuple(len(p.tokens) for p in frame.panes)
            clock = views.clock_note("Race · " + race.clock_text(frame, r.stretch) + " · racing…", "racing")
            yield self.ui.out(**(views.panes(frame) if counts != last else {}), clock=clock)
            last = counts
        end = r.frames[-1]
        how = "race stopped; every run shown in full" if stop.is_set() else "race finished"
        stats = views.pane_stats(bundle, not end_device(bundle).startswith("cuda"))  # τ first on the CPU
        yield self.ui.out(**views.panes(end, stats),
                          clock=views.clock_note(f"Race · {race.clock_text(end, r.stretch)} · {how}", "finished"))

    # ---- inspector, traces, stop, session end
    def inspect(self, bundle, index, request: gr.Request = None):
        try:
            index = int(index)
        except (TypeError, ValueError, OverflowError):
            index = 0
        with self.inspections.slot(_session(request)) as ok:
            if not ok:
                return {c: gr.skip() for c in self.ui.comps(OUTPUTS["inspect_step"])}
            return self.ui.out(**views.inspector(bundle, index))

    def load_trace(self, path, runs, request: gr.Request = None):
        session = _session(request)
        with self.trace_loads.slot(session) as ok:
            if not ok:
                return self.fail("Too many trace loads this minute: wait a moment.")
            return self.load_trace_in(session, path, runs)

    def load_trace_in(self, session, path, runs):
        if not path:
            return self.ui.out(status="No trace file given.", race_go=False)
        if not isinstance(path, str) or not inside(path, self.cfg.rules.upload_dir):
            return self.fail("Traces are read only from files uploaded to the app; a server path is not accepted.")
        try:
            bundle = traceio.load(path, self.cfg.rules.limits.trace)
        except InputError as e:
            return self.fail(str(e))
        finally:
            release_memory()
            remove_file(path)
        g = bundle.main
        both = bundle.vanilla and bundle.drafted
        what = f"{len(bundle.drafted)} drafter(s) and vanilla" if both else f"a {g.mode} run"
        status = (f"✓ Trace loaded: {what} on {tokens.esc(short_name(g.config.get('target', '?')))}, "
                  f"{g.stats.new_tokens} tokens; its image, prompt and settings are restored; replaying it "
                  "(no model used).")
        return {**self.finished(bundle, runs, session, "trace"), **self.restored(bundle), **self.ui.out(status=status)}

    def restored(self, bundle: traceio.Bundle) -> dict:
        """The trace's image and settings back in the controls (webui.request.trace_settings checks them)."""
        g = bundle.main
        allowed = {v for _, v in self.cfg.drafters} if self.cfg.public else None
        names = [str(r.config.get("drafter", "")) for r in bundle.drafted]
        settings = trace_settings(g.config, g.prompt, names, self.cfg.token_limit, allowed)
        return self.ui.out(image=bundle.image if bundle.image is not None else views.SKIP, **settings)

    def scope(self, image, prompt) -> str:
        if not self.cfg.world_scope:
            return ""
        path = image if isinstance(image, str) and inside(image, self.cfg.rules.upload_dir) else None
        return views.scope_html(prompt, path, self.cfg.rules.limits)

    def end_session(self, request: gr.Request):
        """The tab closed: stop its run, remove its trace files and its state, forget its counters."""
        session = _session(request)
        RUNS.stop(session)
        self.files.release(session)
        for limiter in (self.replays, self.inspections, self.trace_loads):
            limiter.forget(session)
        holder = getattr(self.demo, "state_holder", None)
        if holder is not None:
            holder.delete_state(session)


def end_device(bundle: traceio.Bundle) -> str:
    return str(bundle.main.config.get("device", "cpu")) if bundle.main else "cpu"


def request_stop(request: gr.Request):
    """Stop: the run (or race) in progress ends after its current step and says so itself; nothing is
    cancelled, so no output is left half-updated."""
    RUNS.stop(_session(request))  # a session with no run in progress adds nothing


def build_demo(default_target: str | None = None, drafters: list | None = None, default_drafter: str | None = None,
               examples_dir: str | Path | None = None, max_new_tokens_limit: int | None = None,
               race_min_s: float = 8.0, race_max_s: float = 20.0, fps: float = 10.0, live_every_s: float = 0.4,
               cache_examples: bool = True, default_max_new_tokens: int = 64, public: bool | None = None,
               world_scope: bool | None = None) -> gr.Blocks:
    """The whole app as a gr.Blocks; launch it with `launch(demo, ...)` (theme/CSS go to launch in Gradio 6).

    `public` (default: from the environment, see webui.policy) restricts models and tightens limits;
    `world_scope` (default: when the target is the embedded one) warns about out-of-world inputs;
    race_min_s / race_max_s bound the race's length on the slowed clock (a room must follow it)."""
    cfg = make_config(default_target, drafters, default_drafter, examples_dir, max_new_tokens_limit,
                      race_min_s, race_max_s, fps, live_every_s, cache_examples, public, world_scope)
    if cfg.target_missing:
        log.warning("mmspec: WARNING: the default target model %s is missing. The app starts, but runs need a "
                    "target: enter a hub id or a local model directory in the page, set MMSPEC_TARGET, or replay a "
                    "trace file.", cfg.default_target)
    ui = UI()
    session_device = "cuda" if _cuda() else "cpu"
    # Public: Gradio's cached uploads and outputs older than an hour are removed every 15 minutes.
    with gr.Blocks(title="mmspec: speculative decoding for VLMs",
                   delete_cache=(900, 3600) if cfg.public else None) as demo:
        gr.Markdown(INTRO)
        if cfg.world_scope:
            gr.HTML(f'<div class="mmspec-note" id="mmspec-about">{html.escape(card.SCOPE_NOTE)} Questions or '
                    "pictures outside it get a confident but meaningless answer; the page warns when it sees one."
                    "</div>")
        if cfg.target_missing:
            gr.HTML(f'<div class="mmspec-banner">⚠ The embedded default model is missing '
                    f'(<code>{html.escape(cfg.default_target)}</code>). Enter a hub id or a local model directory '
                    f'under <b>Target</b>, or load a trace file below to replay a run offline.</div>')
        _inputs(ui, cfg, default_max_new_tokens)
        ui.status = gr.Markdown("Ready.", elem_id="mmspec-status")
        _race_area(ui)
        tabs = _tabs(ui, session_device)
        ui.bundle_state, ui.race_go, ui.runs_state = gr.State(None), gr.State(False), gr.State([])
        _wire(ui, cfg, demo, tabs)
    demo.mmspec_config = cfg  # type: ignore[attr-defined]
    demo.mmspec_api = {k: api_outputs(k) for k in OUTPUTS}  # type: ignore[attr-defined]
    return demo


def _wire(ui: UI, cfg: AppConfig, demo: gr.Blocks, tabs: list) -> None:
    h = Handlers(ui, cfg, demo)
    def show_shape(shape):
        chain = str(shape).startswith("chain")
        return gr.Row(visible=chain), gr.Row(visible=not chain)

    ui.shape.change(show_shape, ui.shape, [ui.chain_row, ui.tree_row], queue=False, api_visibility="private")
    run_inputs = ui.comps(["image", "prompt", "target", "drafter", "rivals", "shape", "chain_len", "budget", "depth",
                           "topk", "temperature", "top_p", "seed", "max_tokens", "repeats", "runs_state"])
    race_outputs = ui.comps(RACE_OUT)
    run_evt = ui.run_btn.click(h.measure, run_inputs, ui.comps(OUTPUTS["run"]), api_name="run", preprocess=False,
                               concurrency_limit=1, concurrency_id="gpu")
    run_evt.then(h.replay, [ui.bundle_state, ui.race_go, ui.speed], race_outputs, api_visibility="private",
                 concurrency_limit=None, show_progress="hidden")
    ui.replay_btn.click(h.replay, [ui.bundle_state, gr.State(True), ui.speed], race_outputs, api_name="replay_race",
                        concurrency_limit=None, show_progress="hidden")
    ui.step_slider.input(h.inspect, [ui.bundle_state, ui.step_slider], ui.comps(OUTPUTS["inspect_step"]),
                         api_name="inspect_step", concurrency_limit=None, trigger_mode="always_last",
                         show_progress="hidden")
    load_evt = ui.trace_upload.upload(h.load_trace, [ui.trace_upload, ui.runs_state], ui.comps(OUTPUTS["load_trace"]),
                                      api_name="load_trace", concurrency_limit=2, concurrency_id="trace")
    load_evt.then(h.replay, [ui.bundle_state, ui.race_go, ui.speed], race_outputs, api_visibility="private",
                  concurrency_limit=None, show_progress="hidden")
    # Not `cancels=`: a cancelled event leaves its outputs in an error state; the run ends itself instead.
    ui.stop_btn.click(request_stop, None, None, api_name="stop", queue=False)
    for box in (ui.prompt, ui.image):
        box.change(h.scope, [ui.image, ui.prompt], ui.scope, api_visibility="private", queue=False,
                   show_progress="hidden")
    for tab in tabs:
        tab.select(None, None, None, js=RESIZE_JS, api_visibility="private", queue=False)
    demo.unload(h.end_session)
    ui.show_rejected.change(
        None, ui.show_rejected, None, api_visibility="private",
        js="(v) => { document.body.classList.toggle('mmspec-show-rejected', !!v); return v; }")


def launch_kwargs(limits: Limits | None = None) -> dict[str, Any]:
    """What Gradio 6 wants at launch() rather than Blocks(): theme, CSS, the files we serve, upload and
    session bounds."""
    limits = limits or Limits()
    upload = max(limits.max_image_bytes, limits.trace.max_bytes)
    return dict(theme=gr.themes.Soft(), css=PAGE_CSS, allowed_paths=[str(ASSETS)], max_file_size=upload,
                show_error=True, state_session_capacity=limits.max_sessions)


def launch(demo: gr.Blocks, **kwargs):
    """Queue (one run at a time: one GPU; a bounded queue) and launch with the app's theme and CSS."""
    limits = demo.mmspec_config.rules.limits  # type: ignore[attr-defined]
    demo.queue(default_concurrency_limit=1, max_size=limits.queue_size)
    return demo.launch(**{**launch_kwargs(limits), **kwargs})


def quiet_libraries() -> None:
    """No deprecation noise in the terminal: the engine uses transformers' current APIs, and what the
    libraries still warn about is theirs to fix, not the lecturer's to read."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
    except ImportError:  # pragma: no cover
        pass


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    quiet_libraries()
    target = os.environ.get("MMSPEC_TARGET") or str(DEFAULT_TARGET)
    name = "the embedded model" if target == str(DEFAULT_TARGET) else short_name(target)
    if Path(target).exists() or not target.startswith((".", "/", "~")):
        print(f"mmspec: loading {name}…", flush=True)  # the first line: start-up is never silent
        t0 = time.perf_counter()
        try:  # load the default target at startup (module-level cache), so the first click is quick
            MODELS.target(target)
            print(f"mmspec: {name} loaded in {time.perf_counter() - t0:.1f} s; building the page…", flush=True)
        except InputError as e:
            print(f"mmspec: WARNING: cannot load the default target: {e}", flush=True)
    demo = build_demo()
    launch(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
           server_port=int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))))


if __name__ == "__main__":
    main()
