"""mmspec's Gradio app: a race between vanilla and speculative decoding, a step inspector, drafter
internals, a session summary and trace export/replay.

    python app.py                                  # embedded default model, http://127.0.0.1:7860
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7861 python app.py

Configuration (all optional): MMSPEC_TARGET (model dir or hub id), MMSPEC_DRAFTERS (comma-separated
model dirs / hub ids added to the drafter list), MMSPEC_EXAMPLES (a folder with examples.json),
MMSPEC_MAX_NEW_TOKENS (UI limit), MMSPEC_QUEUE_SIZE; MMSPEC_PUBLIC=1 (or a Space's SPACE_ID) turns on
public mode (webui/policy.py: listed models only, tighter limits, MMSPEC_PUBLIC_PAIRS).
Tests call `build_demo(...)` with tiny models instead.

The engine (mmspec/) knows nothing of Gradio and viz/ turns traces into figures and HTML; this file
only wires them. Timing is honest: vanilla and speculative runs are measured one after the other
on the same device (after a warm-up), and the race animation replays their measured timelines.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import html
import json
import logging
import os
import queue
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
from gradio.utils import get_upload_folder

from mmspec import DecodeConfig, Decoder, InputError
from mmspec.defaults import default_method
from mmspec.load import ASSETS, DEFAULT_TARGET
from mmspec.tree import TreeSpec, parse_tree_spec
from viz import bench, charts, internals, race, tokens, traceio, tree_fig
from viz.style import CSS
from webui.policy import Limits, make_policy, public_mode
from webui.request import Rules, RunRequest, inside, parse_request
from webui.session import ModelCache, RateLimiter, RunRegistry, SessionFiles

try:  # Hugging Face ZeroGPU; optional
    import spaces  # type: ignore
except ImportError:  # pragma: no cover - depends on the host
    spaces = None

log = logging.getLogger("mmspec.app")
try:  # glibc's malloc_trim (Linux); elsewhere freed memory is left to the allocator
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - fails here on a libc without it
except (OSError, AttributeError):
    _LIBC = None

MODELS_DIR = ASSETS / "models"
DEFAULT_DRAFT_VLM = MODELS_DIR / "mmspec-draft-vlm"
DEFAULT_DRAFT_TEXT = MODELS_DIR / "mmspec-draft-text"
DEFAULT_EXAMPLES = ASSETS / "examples"
TIMING_NOTE = ("Runs are measured separately on the same device (vanilla first, then speculative, after a "
               "warm-up); the race is a replay of their measured timelines.")
TRACE_DIR = Path(tempfile.mkdtemp(prefix="mmspec-traces-"))


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


# ---------------------------------------------------------------------------- models (module scope, cached)

MODELS = ModelCache()
RUNS = RunRegistry()  # stop flags of the runs in progress
RUN_CACHE: OrderedDict[tuple, traceio.Bundle] = OrderedDict()  # example runs already measured


def gpu(duration: int = 180):
    """`spaces.GPU(duration=...)` on Hugging Face ZeroGPU, a no-op elsewhere."""
    if spaces is not None and hasattr(spaces, "GPU"):
        return spaces.GPU(duration=duration)
    return lambda fn: fn


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


def read_examples(folder: Path | None) -> list[tuple[str, str]]:
    if folder is None or not Path(folder).is_dir():
        return []
    folder = Path(folder)
    out = []
    meta = folder / "examples.json"
    if meta.is_file():
        try:
            items = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            log.warning("ignoring %s: %s", meta, e)
            items = []
        for it in items if isinstance(items, list) else []:
            if isinstance(it, dict) and (folder / str(it.get("image", ""))).is_file():
                out.append((str((folder / it["image"]).resolve()), str(it.get("prompt") or "Describe the image.")))
    else:
        for p in sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg")):
            out.append((str(p.resolve()), "Describe the image."))
    return out


def _hash_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _drafter_list(drafters: list | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if drafters is None:
        if DEFAULT_DRAFT_VLM.exists():
            out.append(("draft VLM (embedded, sees the image)", str(DEFAULT_DRAFT_VLM)))
        if DEFAULT_DRAFT_TEXT.exists():
            out.append(("text-only LM (embedded, blind to the image)", str(DEFAULT_DRAFT_TEXT)))
        # Feature-level drafters (EAGLE family) trained for the embedded target, best first.
        for feat in sorted(MODELS_DIR.glob("mmspec-feat-*"), key=lambda p: (p.name != "mmspec-feat-vispec", p.name)):
            if (feat / "mmspec_drafter.json").exists():
                out.append((f"feature drafter: {feat.name.removeprefix('mmspec-feat-')} (reads target features)", str(feat)))
        head = MODELS_DIR / "mmspec-eagle3-head"
        if (head / "config.json").exists():
            out.append(("EAGLE-3 head (vLLM / SGLang format, reads 3 target layers)", str(head)))
        for extra in filter(None, (os.environ.get("MMSPEC_DRAFTERS") or "").split(",")):
            out.append((extra.strip(), extra.strip()))
    else:
        for d in drafters:
            out.append(tuple(d) if isinstance(d, (tuple, list)) else (str(d), str(d)))
    values = {v for _, v in out}
    if "ngram" not in values:
        out.append(("n-gram (prompt lookup)", "ngram"))
    if "random" not in values:
        out.append(("random (worst case)", "random"))
    return out


def make_config(default_target=None, drafters=None, default_drafter=None, examples_dir=None, max_new_tokens_limit=None,
                race_min_s=3.0, race_max_s=20.0, fps=12.0, live_every_s=0.4, cache_examples=True,
                public: bool | None = None) -> AppConfig:
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
    else:
        dd, default_tree = values[0], "chain:4"
    ex_dir = Path(examples_dir) if examples_dir else Path(os.environ.get("MMSPEC_EXAMPLES") or DEFAULT_EXAMPLES)
    examples = read_examples(ex_dir)
    hashes = set()
    for path, _ in examples:
        try:
            hashes.add(_hash_file(path))
        except OSError:
            pass
    public = public_mode() if public is None else public
    token_limit = int(max_new_tokens_limit or default_token_limit())
    limits = Limits.public(min(token_limit, 256)) if public else Limits(max_new_tokens=token_limit)
    policy = make_policy(public, str(target), values)
    if public:  # the curated hub drafters join the list (the policy says which target each goes with)
        dlist += [(f"{_short_name(d)} (hub)", d) for d in policy.drafters() if d not in values]
    limits = Limits(**{**vars(limits), "queue_size": int(os.environ.get("MMSPEC_QUEUE_SIZE", limits.queue_size))})
    rules = Rules(limits, policy, get_upload_folder(), frozenset(os.path.realpath(p) for p, _ in examples))
    return AppConfig(str(target), missing, dlist, dd, examples, hashes, limits.max_new_tokens, public, rules,
                     float(race_min_s), float(race_max_s), float(fps), float(live_every_s), bool(cache_examples),
                     parse_tree_spec(default_tree))


# ---------------------------------------------------------------------------- views (from a Bundle)

class UI:
    """Handles on the components, filled by build_demo."""

    def __getattr__(self, name):  # pragma: no cover - a typo in wiring should fail loudly
        raise AttributeError(name)


def _short_name(name: str) -> str:
    name = str(name or "?")
    return name.rstrip("/").split("/")[-1] if name.startswith(("/", ".", "~")) else name


def vocab_of(bundle: traceio.Bundle) -> dict[int, str]:
    return tokens.token_vocab(bundle.vanilla, bundle.speculative, extra=bundle.token_texts)


def pane_headers(bundle: traceio.Bundle, t: float | None, state_van: str = "", state_spec: str = "") -> tuple[str, str]:
    """Headers of both panes at measured time t (None = the end)."""
    van, spec = bundle.vanilla, bundle.speculative
    end = race.timeline_s(van, spec) if t is None else t
    vn = race.numbers_at(van, end) if van else None
    sn = race.numbers_at(spec, end) if spec else None
    if van:
        vh = tokens.header_html("Vanilla", _short_name(van.config.get("target", "")), vn.tokens, vn.elapsed_s,
                                vn.tokens_per_s, state=state_van or ("✓ finished" if vn.finished else ""))
    else:
        vh = tokens.header_html("Vanilla", "not in this trace")
    if spec:
        sub = f"{_short_name(spec.config.get('drafter', ''))} · {spec.config.get('tree', '')}"
        sh = tokens.header_html("Speculative", sub, sn.tokens, sn.elapsed_s, sn.tokens_per_s, tau=sn.tau,
                                speedup=race.speedup(vn, sn), state=state_spec or ("✓ finished" if sn.finished else ""))
    else:
        sh = tokens.header_html("Speculative", "not in this trace")
    return vh, sh


def step_markdown(gen, index: int) -> str:
    if gen is None or not gen.steps:
        return "_No run yet._"
    s = gen.steps[max(0, min(index, len(gen.steps) - 1))]
    committed = "".join(s.new_texts)
    nk = {"bonus": "bonus", "correction": "correction", "target": "target token"}.get(s.next_kind, s.next_kind)
    esc = tokens.esc
    return (f"**Step {esc(s.index)}** of {len(gen.steps) - 1} ({esc(s.kind)}) · drafted **{len(s.tree)}** · "
            f"accepted **{len(s.accepted)}** · then {esc(nk)} · "
            f"committed <code>{esc(tokens.visible_text(committed))}</code> · "
            f"draft {s.draft_ms:.1f} ms · verify {s.verify_ms:.1f} ms · step {s.step_ms:.1f} ms · t = {s.elapsed_s:.3f} s")


def inspector_views(ui: UI, bundle: traceio.Bundle | None, index: int) -> dict:
    gen = bundle.main if bundle else None
    if gen is None:
        return {ui.tree_plot: None, ui.step_info: "_No run yet._"}
    vm = internals.find_visual_map(gen, index)
    out = {
        ui.tree_plot: tree_fig.tree_figure(gen, index, vocab_of(bundle)),
        ui.step_info: step_markdown(gen, index),
    }
    if vm is not None:
        out[ui.vmap_plot] = gr.Plot(internals.visual_map_figure(bundle.image, vm), visible=True)
    return out


def all_views(ui: UI, bundle: traceio.Bundle, runs: list[dict], trace_path: str | None) -> dict:
    """Every view rebuilt from a bundle (after a run, or from an uploaded trace)."""
    van, spec = bundle.vanilla, bundle.speculative
    gen = bundle.main
    vocab = vocab_of(bundle)
    vh, sh = pane_headers(bundle, None)
    index = tree_fig.pick_step(gen)
    info = gen.drafter_info if spec else {}
    vm = internals.find_visual_map(spec, index) if spec else None
    has_entropy = bool((info or {}).get("entropy_profile"))
    counts = tokens.fate_counts(spec) if spec else None
    return {
        ui.van_head: vh,
        ui.spec_head: sh,
        ui.van_pane: tokens.tokens_html(van, vocab=vocab, wrap=False) if van else "",
        ui.spec_pane: tokens.tokens_html(spec, vocab=vocab, wrap=False) if spec else "",
        ui.legend: tokens.legend_html(counts),
        ui.clock: clock_note(f"Both runs measured ({race.timeline_s(van, spec):.2f} s of measured time); "
                             "the race replays them."),
        ui.step_slider: gr.Slider(minimum=0, maximum=max(1, len(gen.steps) - 1), value=index, step=1),
        ui.tree_plot: tree_fig.tree_figure(gen, index, vocab),
        ui.step_info: step_markdown(gen, index),
        ui.depth_plot: charts.acceptance_by_depth_figure(spec),
        ui.hist_plot: charts.accepted_length_figure(spec),
        ui.diff_box: tokens.diff_html(van, spec),
        ui.van_text: van.text if van else "",
        ui.spec_text: spec.text if spec else "",
        ui.internals_note: internals.internals_note(spec),
        ui.entropy_plot: gr.Plot(internals.entropy_figure(info) if has_entropy else None, visible=has_entropy),
        ui.vmap_plot: gr.Plot(internals.visual_map_figure(bundle.image, vm) if vm else None, visible=vm is not None),
        ui.info_md: internals.info_markdown(info) if spec else "",
        ui.summary_df: charts.summary_table(runs),
        ui.summary_plot: charts.summary_figure(runs),
        ui.trace_file: trace_path,
    }


def clock_note(text: str) -> str:
    return f'<div class="mmspec-clock">{html.escape(text)}</div>'


def race_clock(t: float, total: float, speed: float | None, done: bool = False) -> str:
    how = f" · replay {race.speed_label(speed)}" if speed is not None else ""
    state = "race finished" if done else "racing…"
    return (f'<div class="mmspec-clock">Measured time <b>{t:.2f}</b> / {total:.2f} s{how} · '
            f'<span class="state">{state}</span></div>')


def save_bundle(bundle: traceio.Bundle, files: SessionFiles | None = None, session: str = "default") -> str:
    """The bundle as a trace file; `files` keeps only the session's latest and removes it when it ends."""
    name = f"mmspec-trace-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}.json"
    path = traceio.save(bundle, TRACE_DIR / name)
    return str(files.add(session, path) if files is not None else path)


# ---------------------------------------------------------------------------- live measurement

def _decode_live(dec: Decoder, stop: threading.Event, every_s: float) -> Iterator[list]:
    """Run a decode in a worker thread; yield the steps so far every `every_s` seconds and at the end.

    The decoder never waits for the page (no pause inside its timeline); Stop ends it after a step.
    """
    steps: list = []
    q: queue.Queue = queue.Queue()
    done = threading.Event()
    errors: list[BaseException] = []

    def work():
        try:
            for s in dec:
                q.put(s)
                if stop.is_set():  # checked here too: a cancelled page may never resume the caller
                    dec.stop()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            done.set()

    th = threading.Thread(target=work, daemon=True, name="mmspec-decode")
    th.start()
    try:
        while not done.wait(every_s):
            if stop.is_set():
                dec.stop()
            while not q.empty():
                steps.append(q.get())
            yield steps
        th.join()
        while not q.empty():
            steps.append(q.get())
        if errors:
            raise errors[0]
        yield steps
    finally:
        dec.stop()  # closed early (Stop / cancel): let the worker end after its current step


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def release_memory() -> None:
    """After a large trace: collect, and hand freed heap pages back to the OS (glibc), so one visitor's
    big file does not stay in the server's resident memory."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _remove_upload(path: str) -> None:
    """An uploaded trace is read once: its copy in Gradio's upload folder goes at once."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _cache_key(req: RunRequest) -> tuple:
    c = req.config
    return (_hash_file(req.image_path), req.prompt, req.target, req.drafter, req.tree, c.temperature, c.top_p,
            c.seed, c.max_new_tokens)


@gpu(duration=180)
def measure_runs(req: RunRequest, session: str, every_s: float) -> Iterator[tuple]:
    """Load, warm up, then measure vanilla and speculative decoding one after the other.

    Yields plain, picklable events (ZeroGPU runs this in another process): ("status", text),
    ("live", mode, spans_html, tokens, elapsed_s, device), ("stopped",), ("done", Bundle, device).
    """
    stop = RUNS.event(session)
    yield ("status", f"Loading {_short_name(req.target)}…")
    tgt = MODELS.target(req.target)
    yield ("status", f"Loading drafter {_short_name(req.drafter)}…")
    dr = MODELS.drafter(req.drafter, tgt)
    yield ("status", f"Warming up on {tgt.device}…")
    MODELS.warm_up(tgt, req.drafter, dr, req.tree)
    results = {}
    for mode, d in (("vanilla", None), ("speculative", dr)):
        dec = Decoder(tgt, d, req.image, req.prompt, DecodeConfig(**vars(req.config)))
        vocab: dict[int, str] = {}
        t0 = time.perf_counter()
        for steps in _decode_live(dec, stop, every_s):
            n = sum(len(s.new_tokens) for s in steps)
            yield ("live", mode, _live_spans(steps, tgt.tokenizer, vocab), n, time.perf_counter() - t0, str(tgt.device))
        if stop.is_set() or dec.result is None:
            yield ("stopped",)
            return
        results[mode] = dec.result
    texts = _target_texts(results["speculative"], tgt.tokenizer)
    yield ("done", traceio.Bundle(results["vanilla"], results["speculative"], req.image, texts), str(tgt.device))


# ---------------------------------------------------------------------------- the page

def build_demo(default_target: str | None = None, drafters: list | None = None, default_drafter: str | None = None,
               examples_dir: str | Path | None = None, max_new_tokens_limit: int | None = None,
               race_min_s: float = 3.0, race_max_s: float = 20.0, fps: float = 12.0, live_every_s: float = 0.4,
               cache_examples: bool = True, default_max_new_tokens: int = 64, public: bool | None = None) -> gr.Blocks:
    """The whole app as a gr.Blocks; launch it with `launch(demo, ...)` (theme/CSS go to launch in Gradio 6).

    `public` (default: from the environment, see webui.policy) restricts models and tightens limits."""
    cfg = make_config(default_target, drafters, default_drafter, examples_dir, max_new_tokens_limit,
                      race_min_s, race_max_s, fps, live_every_s, cache_examples, public)
    limits = cfg.rules.limits
    # Cheap events, per session: one at a time and a few a minute, so one visitor cannot crowd others out.
    replays = RateLimiter(limits.replays_per_minute, limits.max_sessions)
    inspections = RateLimiter(limits.replays_per_minute * 20, limits.max_sessions)  # a slider drag sends many
    trace_loads = RateLimiter(limits.replays_per_minute, limits.max_sessions)
    files = SessionFiles(keep=1, max_sessions=limits.max_sessions)
    if cfg.target_missing:
        log.warning("mmspec: WARNING: the default target model %s is missing. The app starts, but runs need a "
                    "target: enter a hub id or a local model directory in the page, set MMSPEC_TARGET, or replay a "
                    "trace file.", cfg.default_target)
    ui = UI()
    # Public: Gradio's cached uploads and outputs older than an hour are removed every 15 minutes.
    with gr.Blocks(title="mmspec: speculative decoding for VLMs",
                   delete_cache=(900, 3600) if cfg.public else None) as demo:
        gr.Markdown("## mmspec · lossless speculative decoding for vision-language models\n"
                    "A drafter guesses several tokens; the target checks them all in one forward pass and keeps "
                    "exactly what it would have produced on its own. Pick an image, a prompt and a drafter, then **Run**.")
        if cfg.target_missing:
            gr.HTML(f'<div class="mmspec-banner">⚠ The embedded default model is missing '
                    f'(<code>{html.escape(cfg.default_target)}</code>). Enter a hub id or a local model directory '
                    f'under <b>Target</b>, or load a trace file below to replay a run offline.</div>')
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=300):
                ui.image = gr.Image(label="Image", type="filepath", image_mode=None, height=260,
                                    sources=["upload", "clipboard"])
                first_prompt = cfg.examples[0][1] if cfg.examples else "Describe the image."
                ui.prompt = gr.Textbox(first_prompt, label="Prompt", elem_id="mmspec-prompt", lines=2, max_lines=6)
                if cfg.examples:
                    gr.Examples(examples=[[p, q] for p, q in cfg.examples], inputs=[ui.image, ui.prompt],
                                label="Examples (click one, then Run)", examples_per_page=8)
                else:
                    gr.Markdown("_No examples found._", elem_classes="mmspec-note")
            with gr.Column(scale=6, min_width=320):
                target_choices = [(f"{_short_name(cfg.default_target)} (default)", cfg.default_target)]
                if cfg.public:
                    target_choices += [(f"{t} (hub)", t) for t in cfg.rules.policy.targets if t != cfg.default_target]
                ui.target = gr.Dropdown(target_choices, value=cfg.default_target, allow_custom_value=not cfg.public,
                                        label="Target model", elem_id="mmspec-target",
                                        info="the models this public app offers" if cfg.public else
                                        "embedded default, a hub id or a local directory")
                ui.drafter = gr.Dropdown(cfg.drafters, value=cfg.default_drafter, allow_custom_value=not cfg.public,
                                         label="Drafter", elem_id="mmspec-drafter",
                                         info="vanilla is always run as the baseline" +
                                         ("" if cfg.public else "; a path or hub id works too"))
                t0 = cfg.default_tree
                tree0 = t0.kind == "dynamic"
                ui.shape = gr.Radio(["chain", "tree (dynamic)"], value="tree (dynamic)" if tree0 else "chain",
                                    label="Draft shape")
                with gr.Row(visible=not tree0) as chain_row:
                    ui.chain_len = gr.Slider(1, 16, value=t0.depth if t0.kind == "chain" else 4, step=1,
                                             label="chain length")
                with gr.Row(visible=tree0) as tree_row:
                    ui.budget = gr.Slider(1, 128, value=t0.budget if tree0 else 16, step=1, label="budget (nodes)")
                    ui.depth = gr.Slider(1, 12, value=t0.depth if tree0 else 4, step=1, label="depth")
                    ui.topk = gr.Slider(1, 10, value=t0.topk if tree0 else 3, step=1, label="top-k")
                with gr.Row():
                    ui.max_tokens = gr.Slider(1, cfg.token_limit, value=min(default_max_new_tokens, cfg.token_limit),
                                              step=1, label="max new tokens")
                with gr.Accordion("Sampling", open=False):
                    with gr.Row():
                        ui.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                        ui.top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p")
                        ui.seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                with gr.Row():
                    ui.run_btn = gr.Button("Run", variant="primary", elem_id="mmspec-run")
                    ui.stop_btn = gr.Button("Stop", variant="stop", elem_id="mmspec-stop")
        ui.status = gr.Markdown("Ready.", elem_id="mmspec-status")
        gr.HTML(f'<div class="mmspec-note">{html.escape(TIMING_NOTE)}</div>')

        # ---- the race
        ui.clock = gr.HTML(clock_note("The race starts once both runs are measured."), elem_id="mmspec-clock")
        with gr.Row(equal_height=False):
            with gr.Column():
                ui.van_head = gr.HTML(tokens.header_html("Vanilla", "one token per target forward"), elem_id="mmspec-vanilla-head")
                ui.van_pane = gr.HTML("", elem_id="mmspec-vanilla-pane", elem_classes=["mmspec-tokens"])
            with gr.Column():
                ui.spec_head = gr.HTML(tokens.header_html("Speculative", "draft, then verify"), elem_id="mmspec-spec-head")
                ui.spec_pane = gr.HTML("", elem_id="mmspec-spec-pane", elem_classes=["mmspec-tokens"])
        with gr.Row(equal_height=True):
            ui.legend = gr.HTML(tokens.legend_html(), elem_id="mmspec-legend")
        with gr.Row():
            ui.show_rejected = gr.Checkbox(False, label="show rejected draft tokens (struck through)", scale=3)
            ui.replay_btn = gr.Button("Replay race", size="sm", scale=1)

        # ---- details
        with gr.Tabs():
            with gr.Tab("Step inspector"):
                ui.step_slider = gr.Slider(0, 1, value=0, step=1, label="step of the speculative run")
                ui.step_info = gr.Markdown("_No run yet._")
                ui.tree_plot = gr.Plot(label="draft tree", elem_id="mmspec-tree")
                with gr.Row():
                    ui.depth_plot = gr.Plot(label="acceptance by depth")
                    ui.hist_plot = gr.Plot(label="accepted length")
            with gr.Tab("Vanilla vs speculative"):
                ui.diff_box = gr.HTML('<div class="mmspec-diff">Run something to compare outputs.</div>')
                with gr.Row():
                    ui.van_text = gr.Textbox(label="vanilla output", lines=4, interactive=False, buttons=["copy"])
                    ui.spec_text = gr.Textbox(label="speculative output", lines=4, interactive=False, buttons=["copy"])
            with gr.Tab("Drafter internals"):
                ui.internals_note = gr.Markdown(internals.internals_note(None))
                with gr.Row():
                    ui.entropy_plot = gr.Plot(visible=False, label="attention entropy")
                    ui.vmap_plot = gr.Plot(visible=False, label="visual tokens")
                ui.info_md = gr.Markdown("")
            with gr.Tab("Session runs"):
                ui.summary_df = gr.Dataframe(headers=charts.SUMMARY_HEADERS, value=[], interactive=False,
                                             label="runs in this browser session", wrap=True)
                ui.summary_plot = gr.Plot(label="speed-up per run")
            with gr.Tab("Benchmarks", elem_id="mmspec-bench"):
                gr.Markdown("Saved results of the repository's benchmarks (not of your runs): decoding speed of every "
                            "method on held-out prompts, and the projection to 7B models.")
                for saved in bench.saved_figures():
                    gr.Markdown(saved.caption)
                    gr.Plot(saved.figure, label=saved.name)
            with gr.Tab("Trace"):
                gr.Markdown("Download the trace of the last run (both runs, every step), or upload one to replay it "
                            "here without any model.")
                with gr.Row():
                    ui.trace_file = gr.File(label="trace of the last run (JSON)", interactive=False)
                    ui.trace_upload = gr.File(label="replay a trace", file_types=[".json"], type="filepath",
                                              elem_id="mmspec-trace-upload")

        bundle_state = gr.State(None)
        race_go = gr.State(False)
        runs_state = gr.State([])

        view_outputs = [ui.van_head, ui.spec_head, ui.van_pane, ui.spec_pane, ui.legend, ui.clock, ui.step_slider,
                        ui.tree_plot, ui.step_info, ui.depth_plot, ui.hist_plot, ui.diff_box, ui.van_text, ui.spec_text,
                        ui.internals_note, ui.entropy_plot, ui.vmap_plot, ui.info_md, ui.summary_df, ui.summary_plot,
                        ui.trace_file]
        run_outputs = [ui.status] + view_outputs + [bundle_state, race_go, runs_state]
        race_outputs = [ui.clock, ui.van_head, ui.spec_head, ui.van_pane, ui.spec_pane]

        # ---- handlers
        def fail(message: str) -> dict:
            gr.Warning(message)
            return {ui.status: f"⚠ {html.escape(message)}", race_go: False}

        def measure(image, prompt, target, drafter, shape, chain_len, budget, depth, topk, temperature, top_p, seed,
                    max_tokens, runs, request: gr.Request):
            session = _session(request)
            with RUNS.running(session):  # Stop finds this run's flag; the entry goes when the run ends
                yield from measure_in(session, image, prompt, target, drafter, shape, chain_len, budget, depth, topk,
                                      temperature, top_p, seed, max_tokens, runs)

        def measure_in(session, image, prompt, target, drafter, shape, chain_len, budget, depth, topk, temperature,
                       top_p, seed, max_tokens, runs):
            runs = list(runs or [])
            try:
                req = parse_request(cfg.rules, image, prompt, target, drafter, shape, chain_len, budget, depth, topk,
                                    temperature, top_p, seed, max_tokens)
            except InputError as e:
                yield fail(str(e))
                return
            note = f" ({req.note})" if req.note else ""
            key = None
            if cfg.cache_examples:
                try:
                    key = _cache_key(req)
                except OSError:
                    key = None
                if key is not None and key in RUN_CACHE:
                    bundle = RUN_CACHE[key]
                    runs.append(charts.summary_row(len(runs) + 1, bundle.vanilla, bundle.speculative, source="cached"))
                    yield {**all_views(ui, bundle, runs, save_bundle(bundle, files, session)),
                           ui.status: "✓ Example already measured in this app: replaying the stored runs "
                                      "(change any setting to measure anew).",
                           bundle_state: bundle, race_go: True, runs_state: runs}
                    return
            waiting = tokens.header_html("Speculative", "measured after vanilla", state="waiting…")
            yield {ui.status: f"Loading {html.escape(_short_name(req.target))}…{note}", race_go: False,
                   ui.clock: clock_note("Measuring… the race replays once both runs are measured."),
                   ui.van_pane: "", ui.spec_pane: "", ui.spec_head: waiting,
                   ui.van_head: tokens.header_html("Vanilla", "", state="loading…")}
            bundle, device, last_van = None, "?", None
            try:
                for event in measure_runs(req, session, cfg.live_every_s):
                    if event[0] == "status":
                        yield {ui.status: html.escape(event[1]) + note}
                    elif event[0] == "live":
                        _, mode, spans, n, elapsed, device = event
                        pane, head = (ui.van_pane, ui.van_head) if mode == "vanilla" else (ui.spec_pane, ui.spec_head)
                        live_head = tokens.header_html(mode.capitalize(), "measuring (live)", n, elapsed,
                                                       n / elapsed if elapsed > 0 else None, state="measuring…")
                        out = {ui.status: f"Measuring {mode} decoding on {device}… {n} tokens{note}", pane: spans,
                               head: live_head}
                        if mode == "vanilla":
                            last_van = (n, elapsed)
                        elif last_van is not None:  # vanilla is done: say so once
                            out[ui.van_head] = tokens.header_html("Vanilla", "measured", last_van[0], last_van[1],
                                                                  last_van[0] / last_van[1] if last_van[1] > 0 else None,
                                                                  state="✓ measured")
                            last_van = None
                        yield out
                    elif event[0] == "stopped":
                        yield {ui.status: "Stopped.", race_go: False}
                        return
                    elif event[0] == "done":
                        _, bundle, device = event
            except InputError as e:
                yield fail(str(e))
                return
            except Exception as e:  # noqa: BLE001 - keep the app alive, say what happened
                log.error("run failed: %s", traceback.format_exc())
                yield fail(f"Unexpected error: {type(e).__name__}: {e}")
                return
            if bundle is None:
                yield {ui.status: "Stopped.", race_go: False}
                return
            if key is not None and key[0] in cfg.example_hashes:
                RUN_CACHE[key] = bundle
                while len(RUN_CACHE) > 32:
                    RUN_CACHE.popitem(last=False)
            runs.append(charts.summary_row(len(runs) + 1, bundle.vanilla, bundle.speculative))
            van, spec = bundle.vanilla, bundle.speculative
            same = tokens.first_divergence(van.token_ids, spec.token_ids) is None
            speed = spec.stats.tokens_per_s / van.stats.tokens_per_s if van.stats.tokens_per_s else 0.0
            status = (f"✓ Done on {device} ({html.escape(_short_name(req.drafter))}, {req.tree}): vanilla "
                      f"{van.stats.tokens_per_s:.1f} tok/s, speculative {spec.stats.tokens_per_s:.1f} tok/s "
                      f"(τ {spec.stats.tau:.2f}, speed-up {speed:.2f}×); outputs "
                      f"{'identical' if same else 'differ (see the diff tab)'}.{note}")
            yield {**all_views(ui, bundle, runs, save_bundle(bundle, files, session)), ui.status: status,
                   bundle_state: bundle, race_go: True, runs_state: runs}

        def replay(bundle, go=True, request: gr.Request = None):
            if bundle is None or not go:  # nothing new to race: leave the panes as they are
                yield {c: gr.skip() for c in race_outputs}
                return
            with replays.slot(_session(request)) as ok:
                if not ok:
                    gr.Warning("A replay is already playing, or too many replays this minute: wait a moment.")
                    yield {c: gr.skip() for c in race_outputs}
                    return
                yield from race_frames(bundle)

        def race_frames(bundle):
            van, spec = bundle.vanilla, bundle.speculative
            vocab = vocab_of(bundle)
            vs = tokens.step_spans(van, vocab) if van else []
            ss = tokens.step_spans(spec, vocab) if spec else []
            total = race.timeline_s(van, spec)
            speed, times = race.schedule(total, cfg.fps, cfg.race_min_s, cfg.race_max_s)
            start = time.perf_counter()
            last = None
            for t in times:
                wait = start + (t / speed if speed else 0) - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                kv = race.steps_done(van, t) if van else 0
                ks = race.steps_done(spec, t) if spec else 0
                vh, sh = pane_headers(bundle, t)
                frame = (kv, ks, round(t, 2))
                if frame == last:
                    continue
                last = frame
                yield {ui.clock: race_clock(t, total, speed), ui.van_head: vh, ui.spec_head: sh,
                       ui.van_pane: "".join(vs[:kv]), ui.spec_pane: "".join(ss[:ks])}
            vh, sh = pane_headers(bundle, None)
            yield {ui.clock: race_clock(total, total, speed, done=True), ui.van_head: vh, ui.spec_head: sh,
                   ui.van_pane: "".join(vs), ui.spec_pane: "".join(ss)}

        def inspect(bundle, index, request: gr.Request = None):
            try:
                index = int(index)
            except (TypeError, ValueError, OverflowError):
                index = 0
            with inspections.slot(_session(request)) as ok:
                if not ok:
                    return {ui.tree_plot: gr.skip(), ui.step_info: gr.skip(), ui.vmap_plot: gr.skip()}
                return inspector_views(ui, bundle, index)

        def load_trace_file(path, runs, request: gr.Request = None):
            session = _session(request)
            with trace_loads.slot(session) as ok:
                if not ok:
                    return fail("Too many trace loads this minute: wait a moment.")
                return load_trace_in(session, path, runs)

        def load_trace_in(session, path, runs):
            runs = list(runs or [])
            if not path:
                return {ui.status: "No trace file given.", race_go: False}
            if not isinstance(path, str) or not inside(path, cfg.rules.upload_dir):
                return fail("Traces are read only from files uploaded to the app; a server path is not accepted.")
            try:
                bundle = traceio.load(path, limits.trace)
            except InputError as e:
                return fail(str(e))
            finally:
                release_memory()
                _remove_upload(path)
            runs.append(charts.summary_row(len(runs) + 1, bundle.vanilla, bundle.speculative, source="trace"))
            g = bundle.main
            what = "vanilla and speculative runs" if bundle.vanilla and bundle.speculative else f"a {g.mode} run"
            status = (f"✓ Trace loaded: {what} of {tokens.esc(_short_name(g.config.get('target', '?')))}, "
                      f"{g.stats.new_tokens} tokens; replaying it (no model used).")
            return {**all_views(ui, bundle, runs, save_bundle(bundle, files, session)), ui.status: status, bundle_state: bundle,
                    race_go: True, runs_state: runs}

        def request_stop(request: gr.Request):
            RUNS.stop(_session(request))  # a session with no run in progress adds nothing
            return "Stopped."

        def end_session(request: gr.Request):
            """The tab closed: stop its run, remove its trace files and its state, forget its counters."""
            session = _session(request)
            RUNS.stop(session)
            files.release(session)
            for limiter in (replays, inspections, trace_loads):
                limiter.forget(session)
            holder = getattr(demo, "state_holder", None)
            if holder is not None:
                holder.delete_state(session)

        # ---- wiring
        def show_shape(shape):
            chain = str(shape).startswith("chain")
            return gr.Row(visible=chain), gr.Row(visible=not chain)

        ui.shape.change(show_shape, ui.shape, [chain_row, tree_row], queue=False, api_visibility="private")
        run_inputs = [ui.image, ui.prompt, ui.target, ui.drafter, ui.shape, ui.chain_len, ui.budget, ui.depth,
                      ui.topk, ui.temperature, ui.top_p, ui.seed, ui.max_tokens, runs_state]
        run_evt = ui.run_btn.click(measure, run_inputs, run_outputs, api_name="run", preprocess=False,
                                   concurrency_limit=1, concurrency_id="gpu")
        race_evt = run_evt.then(replay, [bundle_state, race_go], race_outputs, api_visibility="private",
                                concurrency_limit=None, show_progress="hidden")
        replay_evt = ui.replay_btn.click(replay, [bundle_state], race_outputs, api_name="replay_race",
                                         concurrency_limit=None, show_progress="hidden")
        ui.step_slider.input(inspect, [bundle_state, ui.step_slider], [ui.tree_plot, ui.step_info, ui.vmap_plot],
                             api_name="inspect_step", concurrency_limit=None, trigger_mode="always_last",
                             show_progress="hidden")
        load_evt = ui.trace_upload.upload(load_trace_file, [ui.trace_upload, runs_state], run_outputs,
                                          api_name="load_trace", concurrency_limit=2, concurrency_id="trace")
        load_race = load_evt.then(replay, [bundle_state, race_go], race_outputs, api_visibility="private",
                                  concurrency_limit=None, show_progress="hidden")
        ui.stop_btn.click(request_stop, None, [ui.status], api_name="stop", queue=False,
                          cancels=[run_evt, race_evt, replay_evt, load_race])
        demo.unload(end_session)
        ui.show_rejected.change(
            None, ui.show_rejected, None, api_visibility="private",
            js="(v) => { document.body.classList.toggle('mmspec-show-rejected', !!v); return v; }")
    demo.mmspec_config = cfg  # type: ignore[attr-defined]
    return demo


def _live_spans(steps: list, tokenizer, vocab: dict[int, str]) -> str:
    """Coloured spans of the steps measured so far (target token texts decoded on demand)."""
    for s in steps:
        for t in s.target_tokens:
            if t not in vocab:
                vocab[t] = tokenizer.decode([t])
    out = []
    for s in steps:
        vocab.update(zip(s.tree.tokens, s.node_texts))
        out.extend(tokens.span(f) for f in tokens.step_fates(s, vocab))
    return "".join(out)


def _target_texts(gen, tokenizer) -> dict[int, str]:
    """Texts of the target's top tokens that appear nowhere else in the trace (for offline replay)."""
    known = tokens.token_vocab(gen)
    need = {t for s in gen.steps for t in s.target_tokens if t not in known}
    return {t: tokenizer.decode([t]) for t in sorted(need)}


def launch_kwargs(limits: Limits | None = None) -> dict[str, Any]:
    """What Gradio 6 wants at launch() rather than Blocks(): theme, CSS, the files we serve, upload and
    session bounds."""
    limits = limits or Limits()
    upload = max(limits.max_image_bytes, limits.trace.max_bytes)
    return dict(theme=gr.themes.Soft(), css=CSS, allowed_paths=[str(ASSETS)], max_file_size=upload, show_error=True,
                state_session_capacity=limits.max_sessions)


def launch(demo: gr.Blocks, **kwargs):
    """Queue (one run at a time: one GPU; a bounded queue) and launch with the app's theme and CSS."""
    limits = demo.mmspec_config.rules.limits  # type: ignore[attr-defined]
    demo.queue(default_concurrency_limit=1, max_size=limits.queue_size)
    return demo.launch(**{**launch_kwargs(limits), **kwargs})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    demo = build_demo()
    cfg = demo.mmspec_config  # type: ignore[attr-defined]
    if not cfg.target_missing:
        try:  # load the default target at startup (module-level cache), so the first click is quick
            MODELS.target(cfg.default_target)
        except InputError as e:
            print(f"mmspec: WARNING: cannot load the default target: {e}", flush=True)
    launch(demo, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
           server_port=int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))))


if __name__ == "__main__":
    main()
