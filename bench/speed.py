"""Decoding speed of every method on held-out prompts of the synthetic world: one command, one table.

Methods (ids filter with --methods: substrings or globs, comma-separated):
- engine:vanilla                 mmspec's own loop with no drafter: the baseline of every speed-up
- hf:generate                    transformers' generate with its default dynamic cache
- hf:generate:static             the same with cache_implementation="static"; on CUDA transformers then
                                 compiles the decode step (torch.compile) in warm-up, for an unknown time,
                                 so this runs last (a run stopped by the budget still has everything else)
- hf:assisted:<name>             generate(assistant_model=<draft VLM>)
- hf:prompt-lookup               generate(prompt_lookup_num_tokens=10)
- engine:<drafter>:<tree>        mmspec with each drafter (draft VLM, text drafter, ngram, feature drafters) x tree
- ...:eager                      on CUDA, when DecodeConfig has `cuda_graphs`: vanilla and the best engine
                                 method at T=0 again with cuda_graphs=False (the fast path's effect)
Per method and temperature: tokens/s per prompt (median, p10-p90), tau = tokens per target forward
after the prefill (the prefill token excluded, as in mmspec's Stats), speed-up over engine:vanilla,
for engine methods also decode tokens/s and speed-up over the decode steps alone and the mean
prefill and drafter-start ms (what end to end adds to them),
the split of decode-step time (prefill excluded) into draft / verify / engine overhead, and at T=0
whether every prompt's tokens equal engine:vanilla's. Every method gets an untimed warm-up
(engine methods: every prompt at every temperature once, so that CUDA graphs of every
forward size the prompts use are captured before timing; HF methods: one generation). Prompts: the first n held-out seeds, describe-kind questions (--kind):
the world's longest answers (the embedded target answers the first eight in 24-145 tokens), not
picked by length.
A failing method records its error and the run goes on; --time-budget-s stops starting new methods
when the budget is near; JSON, markdown (<out>.md) and a plotly figure (<out>.fig.json) are
rewritten after every row, so a killed run leaves usable files.

    python bench/speed.py --n 2 --max-new-tokens 48 --out bench/results/speed_cpu.json
    python bench/speed.py --device cuda --dtype bfloat16 --n 4 --max-new-tokens 128 --time-budget-s 190 \
        --out bench/results/speed_h100.json
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import platform
import re
import statistics
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

T_START = time.perf_counter()  # before the heavy imports: run as a script, --time-budget-s counts them too
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import transformers  # noqa: E402

from mmspec import DecodeConfig, ModelDrafter, generate, load_drafter, load_target  # noqa: E402
from mmspec.defaults import pick_fastest  # noqa: E402
from mmspec.drafters import registry  # noqa: E402
from mmspec.load import ASSETS  # noqa: E402
from mmspec.world import held_out_seeds, sample_example  # noqa: E402
from webui.measure import quantile  # noqa: E402 - the app's measurement protocol's statistics

MODELS = ASSETS / "models"
DEFAULT_DRAFTERS = registry.benchmarked(MODELS)  # every shipped drafter and ngram (random is not worth timing)
Record = dict[str, Any]  # one prompt's outcome: tokens, tps, forwards (after prefill), [draft/verify/overhead ms]


def short(name: str) -> str:
    return Path(name).name.removeprefix("mmspec-")


def load_prompts(n: int, kind: str) -> list[tuple[int, Any, str]]:
    """(seed, image or None, prompt). Describe prompts by default: long answers make speed-ups visible."""
    out = []
    for seed in held_out_seeds(n):
        image, qa, _ = sample_example(seed, None if kind == "mix" else kind)
        out.append((seed, image if qa.needs_image else None, qa.prompt))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def count_forwards(model):
    calls = [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


class Bench:
    """The target, the prompts and the rows so far; a method = one warm-up, then prompts x temperatures."""

    def __init__(self, args: argparse.Namespace, t0: float | None = None):
        self.args = args
        self.t0 = time.perf_counter() if t0 is None else t0
        self.target = load_target(args.target, args.device, args.dtype)
        self.prompts = load_prompts(args.n, args.kind)
        self.hf_inputs = [self._hf_inputs(img, p) for _, img, p in self.prompts]
        self.drafters: dict[str, Any] = {}
        self.rows: list[dict] = []
        self.vanilla: dict[float, list[Record]] = {}
        self.durations: list[float] = []  # seconds per finished method, for the budget estimate
        dev = self.target.device
        cpu = f"CPU {platform.processor() or platform.machine()}"
        self.meta = {
            "hardware": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu,
            "device": str(dev), "dtype": str(self.target.dtype).replace("torch.", ""), "n": args.n,
            "max_new_tokens": args.max_new_tokens, "temperatures": args.temperatures, "kind": args.kind,
            "target": self.target.name, "torch": torch.__version__, "transformers": transformers.__version__,
            "seeds": [s for s, _, _ in self.prompts], "torch_threads": torch.get_num_threads(), "measured": True,
        }

    def _hf_inputs(self, image, prompt: str) -> dict[str, torch.Tensor]:
        # The very inputs the engine prefills with, placed as CachedModel places them.
        t = self.target
        inputs = {k: v.to(t.device) for k, v in t.family.prefill_inputs(t.processor, image, prompt).items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(t.dtype)
        return inputs

    def drafter(self, name: str):
        if name not in self.drafters:
            self.drafters[name] = load_drafter(name, self.target)
        return self.drafters[name]

    # --- one generation per method kind ---------------------------------------------------------
    def engine_one(self, i: int, drafter, temp: float, extra: dict) -> Record:
        seed, image, prompt = self.prompts[i]
        g = generate(self.target, drafter, image, prompt,
                     DecodeConfig(max_new_tokens=self.args.max_new_tokens, temperature=temp, seed=seed, **extra))
        steps = [s for s in g.steps if s.kind != "prefill"]
        d, v = sum(s.draft_ms for s in steps), sum(s.verify_ms for s in steps)
        path = [k.replace("_", " ") for k in ("static_cache", "cuda_graphs") if g.config.get(k)]
        step_ms = sum(s.step_ms for s in steps)
        # Wall time = prefill + the drafter's start (its own prefill) + decode steps.
        prefill_ms = g.stats.prefill_ms
        start_ms = max(0.0, g.stats.wall_s * 1000 - prefill_ms - step_ms)
        return {"tokens": g.token_ids, "tps": g.stats.tokens_per_s, "forwards": len(steps), "draft_ms": d,
                "verify_ms": v, "overhead_ms": max(0.0, step_ms - d - v), "prefill_ms": prefill_ms,
                "start_ms": start_ms, "decode_tps": (len(g.token_ids) - 1) / (step_ms / 1000) if step_ms else None,
                "path": " + ".join(path) or "eager"}

    def hf_one(self, i: int, temp: float, extra: dict, count: bool) -> Record:
        inputs, dev = self.hf_inputs[i], self.target.device
        kw: dict[str, Any] = dict(max_new_tokens=self.args.max_new_tokens, do_sample=temp > 0)
        if temp > 0:  # the engine's pure temperature sampling: no top-k, no top-p
            kw.update(temperature=temp, top_k=0, top_p=1.0)
        torch.manual_seed(self.prompts[i][0])
        with count_forwards(self.target.model) if count else nullcontext([0]) as calls:
            sync(dev)
            t = time.perf_counter()
            out = self.target.model.generate(**inputs, **kw, **extra)
            sync(dev)
            dt = time.perf_counter() - t
        tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
        # Without a hook (plain generate, maybe compiled) one forward per token is the definition.
        forwards = calls[0] - 1 if count else len(tokens) - 1
        return {"tokens": tokens, "tps": len(tokens) / dt, "forwards": forwards}

    def setup_generate(self, static: bool) -> tuple[dict, str]:
        extra: dict[str, Any] = {}
        if static:
            # One max_cache_len for every prompt: one static cache, so one compiled graph on CUDA.
            max_len = max(x["input_ids"].shape[1] for x in self.hf_inputs) + self.args.max_new_tokens + 8
            extra = {"cache_implementation": "static", "max_cache_len": max_len}
        self.hf_one(0, 0.0, extra, False)
        note = "static cache" if static else "dynamic cache"
        if static and self.target.device.type == "cuda":
            note += " (transformers compiled the decode step in warm-up)"
        return extra, note + "; one token per forward"

    def setup_assisted(self) -> tuple[dict, str]:
        d = self.drafter(self.args.assistant)
        if not isinstance(d, ModelDrafter):
            raise ValueError(f"{self.args.assistant} is not a draft model")
        extra = {"assistant_model": d.model}
        # Whether the draft VLM is shown the image is up to transformers: watch its forwards in warm-up.
        seen: list[bool] = []
        hook = d.model.register_forward_pre_hook(lambda m, a, kw: seen.append(
            kw.get("pixel_values") is not None or bool(kw.get("mm_encoder_outputs"))), with_kwargs=True)
        try:
            self.hf_one(0, 0.0, extra, False)
        finally:
            hook.remove()
        sees = "the assistant sees the image" if any(seen) else \
            "transformers passes the assistant no image (neither pixel_values nor image features)"
        return extra, f"dynamic cache, HF's default assistant schedule; {sees}"

    def setup_lookup(self) -> tuple[dict, str]:
        extra = {"prompt_lookup_num_tokens": 10}
        self.hf_one(0, 0.0, extra, False)
        return extra, "dynamic cache"

    # --- rows -----------------------------------------------------------------------------------
    def make_row(self, method: str, temp: float, recs: list[Record], note: str) -> dict:
        tps = [r["tps"] for r in recs]
        fw = sum(r["forwards"] for r in recs)
        row: dict[str, Any] = {
            "method": method, "temperature": temp, "tokens_per_s": statistics.median(tps),
            "tokens_per_s_p10": quantile(tps, 0.1), "tokens_per_s_p90": quantile(tps, 0.9), "tokens_per_s_all": tps,
            "new_tokens": [len(r["tokens"]) for r in recs],
            "tau": sum(len(r["tokens"]) - 1 for r in recs) / fw if fw else None, "target_forwards": fw,
            "note": note, "error": None,
        }
        base = self.vanilla.get(temp)
        row["speedup"] = row["tokens_per_s"] / statistics.median(r["tps"] for r in base) if base else None
        row["lossless"] = (all(r["tokens"] == b["tokens"] for r, b in zip(recs, base)) and len(recs) == len(base)
                           if temp == 0 and base else None)
        if recs[0].get("decode_tps") is not None and all(r["decode_tps"] for r in recs):
            # Decode steps alone (prefill and drafter start excluded): what speculation changes.
            row["decode_tokens_per_s"] = statistics.median(r["decode_tps"] for r in recs)
            row["prefill_ms"] = statistics.mean(r["prefill_ms"] for r in recs)
            row["drafter_start_ms"] = statistics.mean(r["start_ms"] for r in recs)
            if base and all(b.get("decode_tps") for b in base):
                row["decode_speedup"] = row["decode_tokens_per_s"] / statistics.median(b["decode_tps"] for b in base)
        if "draft_ms" in recs[0]:
            parts = {k: sum(r[f"{k}_ms"] for r in recs) for k in ("draft", "verify", "overhead")}
            total = sum(parts.values()) or 1.0
            for k, ms in parts.items():
                row[f"{k}_pct"] = 100 * ms / total
                row[f"{k}_ms_per_step"] = ms / fw if fw else None
        return row

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.meta["wall_s"] = time.perf_counter() - self.t0
        write_outputs(Path(self.args.out), self.meta, self.rows)
        shown = f"{row['tokens_per_s']:.1f} tok/s, tau {row['tau'] or 0:.2f}, x{row['speedup'] or 0:.2f}" \
            if row["error"] is None else row["error"][:150]
        print(f"[{self.meta['wall_s']:6.1f}s] T={row['temperature']:g} {row['method']}: {shown}", flush=True)

    def over_budget(self) -> bool:
        est = statistics.median(self.durations) if self.durations else 0.0
        return time.perf_counter() - self.t0 + est > self.args.time_budget_s

    def run_method(self, method: str, warmup: Callable[[], str | None], one: Callable[[int, float], Record],
                   temps: list[float]) -> None:
        """Warm up once, then every prompt at every temperature; failures become rows with an error."""
        if self.over_budget():
            for temp in temps:
                self.add({"method": method, "temperature": temp, "error": "skipped: time budget"})
            return
        start, note = time.perf_counter(), ""
        try:
            note = warmup() or ""
            warmup_s = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - a method that cannot run is a result, not a crash
            for temp in temps:
                self.add({"method": method, "temperature": temp, "error": f"{type(e).__name__}: {e}"})
            return
        for temp in temps:
            if temp != temps[0] and time.perf_counter() - self.t0 > self.args.time_budget_s:
                self.add({"method": method, "temperature": temp, "error": "skipped: time budget"})
                continue
            try:
                recs = [one(i, temp) for i in range(len(self.prompts))]
                if method == "engine:vanilla":
                    self.vanilla[temp] = recs
                self.add(self.make_row(method, temp, recs, note) | {"warmup_s": warmup_s})
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self.add({"method": method, "temperature": temp, "error": f"{type(e).__name__}: {e}"})
        self.durations.append(time.perf_counter() - start)

    def engine_method(self, method: str, drafter_name: str | None, tree: str | None, temps: list[float],
                      extra: dict | None = None) -> None:
        extra = dict(extra or {}, **({"tree": tree} if tree else {}))
        box: dict[str, Any] = {}

        def warmup() -> str:
            # Every prompt once at every temperature, untimed: the fast path captures one CUDA graph
            # per padded forward size on first use, which a long-running server pays once, not per request.
            box["d"] = self.drafter(drafter_name) if drafter_name else None
            paths = [self.engine_one(i, box["d"], temp, extra)["path"] for temp in temps for i in range(len(self.prompts))]
            return paths[0]

        self.run_method(method, warmup, lambda i, temp: self.engine_one(i, box["d"], temp, extra), temps)

    def hf_method(self, method: str, setup: Callable[[], tuple[dict, str]], temps: list[float],
                  count: bool = True) -> None:
        """setup() warms the method up and returns (extra generate kwargs, note)."""
        box: dict[str, Any] = {}

        def warmup() -> str:
            box["x"], note = setup()
            return note

        self.run_method(method, warmup, lambda i, temp: self.hf_one(i, temp, box["x"], count), temps)


def write_outputs(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(meta, rows))
    try:  # plotly is not installed everywhere the benchmark runs (the GPU image lacks it)
        out.with_suffix(".fig.json").write_text(figure(meta, rows).to_json())
    except ImportError:
        pass


def markdown(meta: dict, rows: list[dict]) -> str:
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    lines = [f"# Decoding speed (measured): {meta['hardware']} ({meta['device']}), {meta['dtype']}, {meta['n']} "
             f"{meta['kind']} prompts, max {meta['max_new_tokens']} new tokens, torch {meta['torch']}, "
             f"transformers {meta['transformers']}", ""]
    for temp in meta["temperatures"]:
        lines += [f"## T={temp:g}", "", "| method | tokens/s median (p10–p90) | tau | speed-up | decode tok/s | "
                  "decode speed-up | prefill + drafter start ms | draft % | verify % | overhead % | = vanilla | "
                  "note/error |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["temperature"] == temp):
            if r.get("error"):
                lines.append(f"| {r['method']} | - | - | - | - | - | - | - | - | - | - | "
                             f"{r['error'][:200].replace('|', '/')} |")
                continue
            lines.append(
                f"| {r['method']} | {r['tokens_per_s']:.1f} ({r['tokens_per_s_p10']:.1f}–{r['tokens_per_s_p90']:.1f}) | "
                f"{fmt(r['tau'], '.2f')} | {fmt(r['speedup'], '.2f')}x | {fmt(r.get('decode_tokens_per_s'), '.1f')} | "
                f"{fmt(r.get('decode_speedup'), '.2f')}x | {fmt(r.get('prefill_ms'), '.1f')} + "
                f"{fmt(r.get('drafter_start_ms'), '.1f')} | {fmt(r.get('draft_pct'), '.0f')} | "
                f"{fmt(r.get('verify_pct'), '.0f')} | {fmt(r.get('overhead_pct'), '.0f')} | {fmt(r['lossless'], '')} | "
                f"{r['note']} |")
        lines.append("")
    lines.append("tau: tokens per target forward after the prefill. decode tok/s: tokens after the first over the "
                 "decode steps' time (prefill and drafter start excluded). draft/verify/overhead: shares of decode-step "
                 "time. = vanilla: every prompt's tokens equal engine:vanilla's (T=0 only).")
    return "\n".join(lines) + "\n"


def figure(meta: dict, rows: list[dict]):
    import plotly.graph_objects as go

    fig = go.Figure()
    for temp in meta["temperatures"]:
        ok = [r for r in rows if r["temperature"] == temp and not r.get("error") and r["speedup"] is not None]
        fig.add_bar(name=f"T={temp:g}", x=[r["method"] for r in ok], y=[r["speedup"] for r in ok],
                    customdata=[[r["tokens_per_s"], r["tau"] or 0.0] for r in ok],
                    hovertemplate="%{x}<br>speed-up %{y:.2f}x<br>%{customdata[0]:.1f} tokens/s<br>tau %{customdata[1]:.2f}")
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(barmode="group", yaxis_title="speed-up over engine:vanilla (median tokens/s)",
                      title=f"{meta['hardware']}, {meta['dtype']}, {meta['n']} prompts, max {meta['max_new_tokens']} "
                            "new tokens (measured)")
    return fig


def selected(method: str, patterns: list[str]) -> bool:
    return not patterns or any(fnmatch.fnmatch(method, p) if any(c in p for c in "*?[") else p in method
                               for p in patterns)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=None, help="target directory (default: the embedded model)")
    ap.add_argument("--drafters", default=",".join(DEFAULT_DRAFTERS), help="comma-separated drafter names/paths")
    ap.add_argument("--assistant", default=str(MODELS / "mmspec-draft-vlm"), help="draft VLM for hf:assisted")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--kind", default="describe", help="world question kind of the prompts, or 'mix'")
    ap.add_argument("--methods", default="", help="comma-separated substrings or globs of method ids")
    ap.add_argument("--trees", default="chain:4;chain:12;dynamic:24,5,4", help="semicolon-separated tree specs")
    ap.add_argument("--hf-cache", default="both", choices=["both", "dynamic", "static"],
                    help="hf:generate's cache(s); static runs last: on CUDA it compiles for an unknown time")
    ap.add_argument("--time-budget-s", type=float, default=float("inf"))
    ap.add_argument("--out", default="bench/results/speed.json")
    ap.add_argument("--write-default", default=None, metavar="FILE",
                    help="record the fastest lossless engine method at T=0 here (the app's and CLI's default: "
                         "assets/default_method.json)")
    args = ap.parse_args(argv)
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    args.methods = [p for p in re.split(r",(?!\d)", args.methods) if p]  # tree ids hold ",<digit>"
    return args


def main(argv: list[str] | None = None, t0: float | None = None) -> dict:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    b = Bench(args, t0)
    temps, pats = args.temperatures, args.methods
    # The fast path's effect (eager rows) only exists on CUDA and once the engine has the switch.
    has_graphs = b.target.device.type == "cuda" and "cuda_graphs" in {f.name for f in dataclasses.fields(DecodeConfig)}
    # The baseline always runs: every speed-up and lossless flag is relative to it.
    b.engine_method("engine:vanilla", None, None, temps)
    if has_graphs and 0.0 in temps:
        b.engine_method("engine:vanilla:eager", None, None, [0.0], {"cuda_graphs": False})
    if selected("hf:generate", pats) and args.hf_cache != "static":
        b.hf_method("hf:generate", lambda: b.setup_generate(False), temps, count=False)
    assistant = f"hf:assisted:{short(args.assistant)}"
    if selected(assistant, pats):
        b.hf_method(assistant, b.setup_assisted, temps)
    if selected("hf:prompt-lookup", pats):
        b.hf_method("hf:prompt-lookup", b.setup_lookup, temps)
    engine: dict[str, tuple[str, str]] = {}
    for name in [d for d in args.drafters.split(",") if d]:
        for tree in [t for t in args.trees.split(";") if t]:
            method = f"engine:{short(name)}:{tree}"
            if selected(method, pats):
                engine[method] = (name, tree)
                b.engine_method(method, name, tree, temps)
    greedy = [r for r in b.rows if r["method"] in engine and r["temperature"] == 0 and not r.get("error")]
    if has_graphs and greedy:
        best = max(greedy, key=lambda r: r["tokens_per_s"])["method"]
        b.engine_method(f"{best}:eager", *engine[best], [0.0], {"cuda_graphs": False})
    if selected("hf:generate:static", pats) and args.hf_cache != "dynamic":
        b.hf_method("hf:generate:static", lambda: b.setup_generate(True), temps, count=False)
    hf = [r for r in b.rows if r["method"].startswith("hf:generate") and r["temperature"] == 0 and not r["error"]]
    b.meta["hf_greedy_equals_engine_vanilla"] = {r["method"]: r["lossless"] for r in hf}
    b.meta["wall_s"] = time.perf_counter() - b.t0
    write_outputs(Path(args.out), b.meta, b.rows)
    print(markdown(b.meta, b.rows))
    if args.write_default:
        best = pick_fastest(b.rows, b.meta)
        if best is not None:
            best["measured"]["source"] = Path(args.out).name
            Path(args.write_default).write_text(json.dumps(best, indent=1) + "\n")
            print(f"default method: {best['drafter']} {best['tree']} -> {args.write_default}")
    return {"meta": b.meta, "rows": b.rows}


if __name__ == "__main__":
    main(t0=T_START)
