"""Live measurement for the page, Gradio-free: the models come from the cache (webui.session), vanilla
and up to three drafters are measured with the protocol of webui.measure (warm-up, then rounds of
timed runs) in a worker thread, and the caller gets plain, picklable events to show:

    ("status", text)        loading, warming up
    ("live", Live)          the run in progress so far (every `every_s` seconds)
    ("stopped", Live|None)  Stop was pressed: the run in progress ends after its current step
    ("done", Result)        every method measured

Why a worker thread: the decode never waits for the page (no pause inside its measured timeline),
and the page still sees tokens while they are produced. The target's attention entropy per layer
is computed on the request's own image and prompt (one prefill): it is a property of the target,
so every run shows it, whatever the drafter.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from mmspec import DecodeConfig, Decoder, InputError
from mmspec.trace import Generation, StepRecord
from viz.traceio import Bundle
from webui import measure
from webui.request import RunRequest
from webui.session import ModelCache

MAX_DRAFTERS = 3  # vanilla + up to 3 drafters race on one prompt


@dataclass
class Live:
    """What the page shows while measuring: the run in progress."""
    method: int  # 0 = vanilla, 1.. = the drafters in request order
    label: str
    run: int  # 0 = the warm-up, 1..repeats = timed runs
    repeats: int
    steps: list[StepRecord] = field(default_factory=list)
    elapsed_s: float = 0.0
    device: str = "?"
    eos_ids: frozenset[int] = frozenset()

    @property
    def tokens(self) -> int:
        return sum(len(s.new_tokens) for s in self.steps)

    @property
    def what(self) -> str:
        return "warm-up" if self.run == 0 else f"run {self.run} of {self.repeats}"


@dataclass
class Result:
    measurements: list[measure.Measurement]  # vanilla first
    comparisons: list[measure.Comparison]  # each drafter against vanilla
    bundle: Bundle  # the median runs, what the race replays
    labels: list[str]
    eos_ids: set[int]


class Stopped(Exception):
    """Raised inside a decode when the page asked to stop."""


def target_entropy(target, image, prompt: str) -> list[float] | None:
    """The target's attention entropy per decoder layer over the prompt's text after the image; None
    for a family whose attention the engine cannot recompute exactly (mmspec.entropy refuses it)."""
    from mmspec.drafters.feature.calibrate import calibrate_entropy

    try:
        profile = calibrate_entropy(target, [(image, prompt)])
    except (InputError, TypeError, ValueError, RuntimeError):
        return None
    return profile if profile and all(math.isfinite(x) for x in profile) else None


def target_texts(gen: Generation, tokenizer) -> dict[int, str]:
    """Texts of the target's top tokens that appear nowhere else in the trace (for offline replay)."""
    from viz.tokens import token_vocab

    known = token_vocab(gen)
    need = {t for s in gen.steps for t in s.target_tokens if t not in known}
    return {t: tokenizer.decode([t]) for t in sorted(need)}


class _Runner:
    """The worker's side: one decode function per method, each reporting its steps to `live`."""

    def __init__(self, target, req: RunRequest, stop: threading.Event, repeats: int):
        self.target, self.req, self.stop, self.repeats = target, req, stop, repeats
        self.live: Live | None = None
        self.lock = threading.Lock()

    def decode_fn(self, method: int, label: str, drafter) -> Callable[[], Generation]:
        calls = iter(range(10**9))  # 0 = the warm-up

        def decode() -> Generation:
            live = Live(method, label, next(calls), self.repeats, device=str(self.target.device),
                        eos_ids=frozenset(self.target.eos_ids))
            with self.lock:
                self.live = live
            dec = Decoder(self.target, drafter, self.req.image, self.req.prompt, DecodeConfig(**vars(self.req.config)))
            t0 = time.perf_counter()
            for s in dec:
                with self.lock:
                    live.steps.append(s)
                    live.elapsed_s = time.perf_counter() - t0
                if self.stop.is_set():
                    dec.stop()
            if self.stop.is_set() or dec.result is None:
                raise Stopped()
            return dec.result
        return decode

    def snapshot(self) -> Live | None:
        with self.lock:
            live = self.live
            if live is None:
                return None
            return Live(live.method, live.label, live.run, live.repeats, list(live.steps), live.elapsed_s, live.device,
                        live.eos_ids)


def measure_live(models: ModelCache, req: RunRequest, drafters: list[str], labels: list[str],
                 stop: threading.Event, repeats: int = measure.MIN_REPEATS, every_s: float = 0.4) -> Iterator[tuple]:
    """Load, then measure vanilla and `drafters` (labels: vanilla's first) by the protocol; see the
    module docstring for the events. InputError (a model that cannot load) propagates."""
    if not 1 <= len(drafters) <= MAX_DRAFTERS:
        raise InputError(f"race 1 to {MAX_DRAFTERS} drafters against vanilla, not {len(drafters)}")
    events: queue.Queue = queue.Queue()
    box: dict = {}
    runner_box: dict = {}

    def work():
        try:
            events.put(("status", f"Loading {labels[0]}…"))
            target = models.target(req.target)
            loaded = []
            for name, label in zip(drafters, labels[1:]):
                events.put(("status", f"Loading drafter {label}…"))
                loaded.append(models.drafter(name, target))
            events.put(("status", f"Reading the target's attention on {target.device}…"))
            entropy = target_entropy(target, req.image, req.prompt)
            runner = runner_box["r"] = _Runner(target, req, stop, repeats)
            decodes = {"vanilla": runner.decode_fn(0, labels[0], None)}
            for i, (name, d) in enumerate(zip(drafters, loaded), 1):
                decodes[name] = runner.decode_fn(i, labels[i], d)
            found = measure.measure_all(decodes, repeats)
            box["result"] = _result(found, drafters, labels, target, req, entropy)
        except Stopped:
            box["stopped"] = True
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e
        finally:
            events.put(("end",))

    th = threading.Thread(target=work, daemon=True, name="mmspec-measure")
    th.start()
    last_tokens = None
    try:
        while True:
            try:
                ev = events.get(timeout=every_s)
            except queue.Empty:
                ev = None
            if ev is not None and ev[0] == "end":
                break
            if ev is not None:
                yield ev
            live = runner_box["r"].snapshot() if "r" in runner_box else None
            if live is not None and (live.method, live.run, live.tokens) != last_tokens:
                last_tokens = (live.method, live.run, live.tokens)
                yield ("live", live)
        th.join()
        if "error" in box:
            raise box["error"]
        if "stopped" in box:
            yield ("stopped", runner_box["r"].snapshot() if "r" in runner_box else None)
            return
        yield ("done", box["result"])
    finally:
        stop.set()  # closed early (the page went away): the worker ends after its current step


def _result(found: dict[str, measure.Measurement], drafters: list[str], labels: list[str], target, req: RunRequest,
            entropy: list[float] | None) -> Result:
    ms = [found["vanilla"], *(found[d] for d in drafters)]
    ms = [measure.Measurement(**{**vars(m), "method": label}) for m, label in zip(ms, labels)]
    comps = measure.compare_all(ms[0], ms[1:])
    reps = [m.representative for m in ms]
    texts: dict[int, str] = {}
    for g in reps[1:]:
        texts.update(target_texts(g, target.tokenizer))
    vs = [None, *comps]
    jsons = [{**measure.as_json(m, c), "label": label} for m, c, label in zip(ms, vs, labels)]
    bundle = Bundle(reps[0], reps[1], req.image, texts, reps[2:], jsons, entropy)
    return Result(ms, comps, bundle, labels, set(target.eos_ids))
