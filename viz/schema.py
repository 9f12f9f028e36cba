"""The schema of a trace file, checked in one pass before anything is built or drawn from it.

A trace may come from anyone (shared files are replayed in the app), so every value is checked for
its type, its range and its size, and for the relations the views rely on: a node's parent comes
before it (no cycles), depths follow the parents, the accepted nodes form a path from the root,
`token_ids` is what the steps committed, times are finite, non-negative and non-decreasing.
Free-form dicts (config, drafter_info, step extras) are walked with a bounded budget.

The walk is iterative (no recursion) and stops at the first problem with one message that says
where it is, e.g. `speculative.steps[3].tree.parents[2]: ...`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mmspec.errors import InputError

MODES = ("speculative", "vanilla")
STEP_KINDS = ("prefill", "draft", "vanilla")
NEXT_KINDS = ("bonus", "correction", "target")
VISUAL_STATUSES = ("kept", "merged", "dropped")
INT64 = 2**63


@dataclass(frozen=True)
class TraceLimits:
    """Sizes a trace may have. The defaults hold any run the app or CLI makes (1024 new tokens,
    128-node trees) with room to spare, and keep one replay to well under a second of checking."""
    max_bytes: int = 32 * 2**20
    max_steps: int = 4096
    max_nodes: int = 1024  # per draft tree
    max_depth: int = 128  # a draft tree's depth (the tree view lays out one level per column)
    max_total_nodes: int = 400_000  # over all steps of a run
    max_token_text: int = 1000  # characters of one token's text
    max_text: int = 200_000  # prompt, output text
    max_token_id: int = 2**31 - 1
    max_grid_cells: int = 16_384  # visual-token map
    max_free_items: int = 20_000  # values in one free-form dict (config, drafter_info, a step's extras)
    max_free_depth: int = 8
    max_total_extras: int = 2_000_000  # values in all steps' extras (visual-map cells included): bounds the check
    max_seconds: float = 1e6
    max_ms: float = 1e9
    max_image_chars: int = 4 * 2**20  # the embedded thumbnail (a data: URI)


def refuse(where: str, what: str):
    raise InputError(f"this trace is malformed: {where}: {what}")


# ---------------------------------------------------------------- scalars

def check_int(v: Any, where: str, lo: int, hi: int) -> int:
    if type(v) is not int:  # bool is an int subclass: refused too
        refuse(where, f"expected a whole number, got {type(v).__name__}")
    if not lo <= v <= hi:
        refuse(where, f"{_short(v)} is outside [{lo}, {hi}]")
    return v


def check_num(v: Any, where: str, lo: float, hi: float) -> float:
    if type(v) not in (int, float):
        refuse(where, f"expected a number, got {type(v).__name__}")
    if not (math.isfinite(v) and lo <= v <= hi):
        refuse(where, f"{_short(v)} is outside [{lo:g}, {hi:g}]")
    return v


def check_str(v: Any, where: str, max_len: int) -> str:
    if type(v) is not str:
        refuse(where, f"expected text, got {type(v).__name__}")
    if len(v) > max_len:
        refuse(where, f"text of {len(v)} characters (the limit is {max_len})")
    return v


def check_choice(v: Any, where: str, choices: tuple[str, ...]) -> str:
    if type(v) is not str or v not in choices:
        refuse(where, f"expected one of {', '.join(choices)}, got {_short(v)}")
    return v


def _short(v: Any) -> str:
    text = repr(v) if not isinstance(v, int) or abs(v) < 10**30 else f"an integer of {len(str(abs(v)))} digits"
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------- containers

def check_list(v: Any, where: str, max_len: int, length: int | None = None) -> list:
    if type(v) is not list:
        refuse(where, f"expected a list, got {type(v).__name__}")
    if len(v) > max_len:
        refuse(where, f"{len(v)} entries (the limit is {max_len})")
    if length is not None and len(v) != length:
        refuse(where, f"{len(v)} entries where {length} are needed")
    return v


# The list checks take a fast path over the whole list first (most traces are fine) and only walk it
# element by element to say where the first problem is.

def check_ints(v: Any, where: str, max_len: int, lo: int, hi: int, length: int | None = None) -> list[int]:
    check_list(v, where, max_len, length)
    if all(type(x) is int for x in v) and (not v or lo <= min(v) and max(v) <= hi):
        return v
    for i, x in enumerate(v):
        check_int(x, f"{where}[{i}]", lo, hi)
    return v


def check_nums(v: Any, where: str, max_len: int, lo: float, hi: float, length: int | None = None) -> list[float]:
    check_list(v, where, max_len, length)
    if all(type(x) is float or type(x) is int for x in v) and all(map(math.isfinite, v)) and \
            (not v or lo <= min(v) and max(v) <= hi):
        return v
    for i, x in enumerate(v):
        check_num(x, f"{where}[{i}]", lo, hi)
    return v


def check_strs(v: Any, where: str, max_len: int, max_chars: int, length: int | None = None) -> list[str]:
    check_list(v, where, max_len, length)
    if all(type(x) is str for x in v) and (not v or max(map(len, v)) <= max_chars):
        return v
    for i, x in enumerate(v):
        check_str(x, f"{where}[{i}]", max_chars)
    return v


def check_keys(v: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if type(v) is not dict:
        refuse(where, f"expected an object, got {type(v).__name__}")
    unknown = [k for k in v if k not in required and k not in optional]
    if unknown:
        refuse(where, f"unknown field {_short(unknown[0])}")
    missing = [k for k in required if k not in v]
    if missing:
        refuse(where, f"missing field {missing[0]!r}")
    return v


def check_free(v: Any, where: str, lim: TraceLimits) -> int:
    """Any JSON value of bounded size and depth, with finite numbers, text keys and bounded text;
    returns how many values it holds."""
    stack = [(v, where, 0)]
    items = 0
    while stack:
        x, at, depth = stack.pop()
        items += 1
        if items > lim.max_free_items:
            refuse(where, f"more than {lim.max_free_items} values")
        if depth > lim.max_free_depth:
            refuse(at, f"nested deeper than {lim.max_free_depth} levels")
        if x is None or type(x) is bool:
            continue
        if type(x) is int:
            check_int(x, at, -INT64, INT64 - 1)
        elif type(x) is float:
            check_num(x, at, -math.inf, math.inf)
        elif type(x) is str:
            check_str(x, at, lim.max_token_text)
        elif type(x) is list:
            stack.extend((y, f"{at}[{i}]", depth + 1) for i, y in enumerate(x))
        elif type(x) is dict:
            for k, y in x.items():
                check_str(k, f"{at} (a key)", 100)
                stack.append((y, f"{at}.{k}", depth + 1))
        else:
            refuse(at, f"unexpected {type(x).__name__}")
    return items


# ---------------------------------------------------------------- a run

GENERATION_KEYS = ("mode", "config", "prompt", "prompt_tokens", "token_ids", "text", "steps", "stats")
STEP_KEYS = ("index", "kind", "tree", "node_texts", "target_tokens", "target_texts", "target_probs", "accepted",
             "next_token", "next_kind", "next_text", "new_tokens", "new_texts", "draft_ms", "verify_ms", "step_ms",
             "elapsed_s")
TREE_KEYS = ("tokens", "parents", "depths", "draft_probs")
STATS_KEYS = ("new_tokens", "steps", "tau", "mean_accepted", "acceptance_by_depth", "drafted_by_depth", "wall_s",
              "prefill_ms", "tokens_per_s", "draft_ms", "verify_ms", "overhead_ms")


def check_tree(t: Any, where: str, lim: TraceLimits) -> int:
    """A draft tree: parallel lists; each parent earlier than its node; depth = parent's depth + 1."""
    check_keys(t, where, TREE_KEYS)
    n = len(check_list(t["tokens"], f"{where}.tokens", lim.max_nodes))
    check_ints(t["tokens"], f"{where}.tokens", n, 0, lim.max_token_id)
    parents = check_ints(t["parents"], f"{where}.parents", n, -1, max(n - 1, -1), length=n)
    depths = check_ints(t["depths"], f"{where}.depths", n, 1, lim.max_depth, length=n)
    check_nums(t["draft_probs"], f"{where}.draft_probs", n, 0.0, 1.0, length=n)
    for i, p in enumerate(parents):
        if p >= i:
            refuse(f"{where}.parents[{i}]", f"a node's parent must come before it (node {i}, parent {p})")
        if depths[i] != (depths[p] + 1 if p >= 0 else 1):
            refuse(f"{where}.depths[{i}]", f"depth {depths[i]} does not follow its parent {p}")
    return n


def check_accepted(acc: Any, parents: list[int], where: str) -> None:
    """Accepted nodes: a path from the root, each the child of the one before."""
    check_ints(acc, where, len(parents), 0, max(len(parents) - 1, 0))
    prev = -1
    for i, node in enumerate(acc):
        if parents[node] != prev:
            refuse(f"{where}[{i}]", f"node {node} is not a child of the accepted node before it")
        prev = node


def check_visual_map(vm: Any, where: str, lim: TraceLimits) -> int:
    """Kept / merged / dropped per cell of a rows × cols grid (groups and saliency per cell, optional)."""
    check_keys(vm, where, ("grid", "status"), ("mode", "groups", "saliency"))
    rows, cols = check_ints(vm["grid"], f"{where}.grid", 2, 1, lim.max_grid_cells, length=2)
    n = rows * cols
    if n > lim.max_grid_cells:
        refuse(f"{where}.grid", f"{rows}×{cols} cells (the limit is {lim.max_grid_cells})")
    status = check_list(vm["status"], f"{where}.status", n, length=n)
    for i, s in enumerate(status):
        if type(s) is not str or s not in VISUAL_STATUSES:
            check_choice(s, f"{where}.status[{i}]", VISUAL_STATUSES)
    if "mode" in vm:
        check_str(vm["mode"], f"{where}.mode", 100)
    if "groups" in vm:
        check_ints(vm["groups"], f"{where}.groups", n, 0, n, length=n)
    if vm.get("saliency") is not None:
        check_nums(vm["saliency"], f"{where}.saliency", n, -1e9, 1e9, length=n)
    return n


def check_extras(x: Any, where: str, lim: TraceLimits) -> int:
    """A step's drafter extras; returns how many values they hold."""
    if type(x) is not dict:
        refuse(where, f"expected an object, got {type(x).__name__}")
    cells = check_visual_map(x["visual_map"], f"{where}.visual_map", lim) if "visual_map" in x else 0
    return cells + check_free({k: v for k, v in x.items() if k != "visual_map"}, where, lim)


def check_step(s: Any, where: str, index: int, lim: TraceLimits) -> tuple[int, int]:
    """One step; returns its number of draft nodes and of values in its extras."""
    check_keys(s, where, STEP_KEYS, ("extras",))
    check_int(s["index"], f"{where}.index", index, index)
    check_choice(s["kind"], f"{where}.kind", STEP_KINDS)
    n = check_tree(s["tree"], f"{where}.tree", lim)
    check_strs(s["node_texts"], f"{where}.node_texts", n, lim.max_token_text, length=n)
    check_ints(s["target_tokens"], f"{where}.target_tokens", n, 0, lim.max_token_id, length=n)
    check_strs(s["target_texts"], f"{where}.target_texts", n, lim.max_token_text, length=n)
    check_nums(s["target_probs"], f"{where}.target_probs", n, 0.0, 1.0, length=n)
    check_accepted(s["accepted"], s["tree"]["parents"], f"{where}.accepted")
    check_int(s["next_token"], f"{where}.next_token", 0, lim.max_token_id)
    check_choice(s["next_kind"], f"{where}.next_kind", NEXT_KINDS)
    check_str(s["next_text"], f"{where}.next_text", lim.max_token_text)
    m = len(check_ints(s["new_tokens"], f"{where}.new_tokens", len(s["accepted"]) + 1, 0, lim.max_token_id))
    check_strs(s["new_texts"], f"{where}.new_texts", m, lim.max_token_text, length=m)
    for key in ("draft_ms", "verify_ms", "step_ms"):
        check_num(s[key], f"{where}.{key}", 0.0, lim.max_ms)
    check_num(s["elapsed_s"], f"{where}.elapsed_s", 0.0, lim.max_seconds)
    return n, check_extras(s["extras"], f"{where}.extras", lim) if "extras" in s else 0


def check_steps(steps: Any, where: str, lim: TraceLimits) -> list[int]:
    """Every step, in order; returns the committed tokens (what `token_ids` must be)."""
    check_list(steps, where, lim.max_steps)
    committed: list[int] = []
    nodes, extras, last_t = 0, 0, 0.0
    for i, s in enumerate(steps):
        n, x = check_step(s, f"{where}[{i}]", i, lim)
        nodes, extras = nodes + n, extras + x
        if nodes > lim.max_total_nodes:
            refuse(where, f"more than {lim.max_total_nodes} draft nodes in all")
        if extras > lim.max_total_extras:
            refuse(where, f"more than {lim.max_total_extras} values in the steps' extras")
        if s["elapsed_s"] < last_t:
            refuse(f"{where}[{i}].elapsed_s", "time goes backwards")
        last_t = s["elapsed_s"]
        committed.extend(s["new_tokens"])
    return committed


def check_stats(st: Any, where: str, lim: TraceLimits) -> None:
    check_keys(st, where, STATS_KEYS)
    for key in ("new_tokens", "steps"):
        check_int(st[key], f"{where}.{key}", 0, lim.max_steps * (lim.max_nodes + 1))
    for key in ("tau", "mean_accepted"):
        check_num(st[key], f"{where}.{key}", 0.0, lim.max_nodes + 1)
    d = len(check_nums(st["acceptance_by_depth"], f"{where}.acceptance_by_depth", lim.max_depth, 0.0, 1.0))
    check_ints(st["drafted_by_depth"], f"{where}.drafted_by_depth", d, 0, lim.max_steps, length=d)
    check_num(st["wall_s"], f"{where}.wall_s", 0.0, lim.max_seconds)
    check_num(st["tokens_per_s"], f"{where}.tokens_per_s", 0.0, 1e9)
    for key in ("prefill_ms", "draft_ms", "verify_ms", "overhead_ms"):
        check_num(st[key], f"{where}.{key}", 0.0, lim.max_ms * lim.max_steps)


def check_config(c: Any, where: str, lim: TraceLimits) -> None:
    if type(c) is not dict:
        refuse(where, f"expected an object, got {type(c).__name__}")
    check_free(c, where, lim)
    for key in ("target", "drafter", "tree", "device", "dtype"):
        if key in c:
            check_str(c[key], f"{where}.{key}", 1000)
    if "temperature" in c:
        check_num(c["temperature"], f"{where}.temperature", 0.0, 100.0)
    if "top_p" in c:
        check_num(c["top_p"], f"{where}.top_p", 0.0, 1.0)


def check_drafter_info(info: Any, where: str, lim: TraceLimits) -> None:
    if type(info) is not dict:
        refuse(where, f"expected an object, got {type(info).__name__}")
    check_free(info, where, lim)
    if info.get("entropy_profile") is not None:
        check_nums(info["entropy_profile"], f"{where}.entropy_profile", 1024, -1e6, 1e6)
    if info.get("chosen_layers") is not None:  # the figure skips layers beyond the profile
        check_ints(info["chosen_layers"], f"{where}.chosen_layers", 1024, 0, 1023)
    if "name" in info:
        check_str(info["name"], f"{where}.name", 1000)


def check_generation(g: Any, where: str, lim: TraceLimits = TraceLimits()) -> None:
    """A `Generation.to_dict()`: every field, then the relations between them."""
    check_keys(g, where, GENERATION_KEYS, ("drafter_info", "version"))
    check_choice(g["mode"], f"{where}.mode", MODES)
    if "version" in g:
        check_int(g["version"], f"{where}.version", 1, 1)
    check_config(g["config"], f"{where}.config", lim)
    check_str(g["prompt"], f"{where}.prompt", lim.max_text)
    check_int(g["prompt_tokens"], f"{where}.prompt_tokens", 0, 10**7)
    check_str(g["text"], f"{where}.text", lim.max_text)
    committed = check_steps(g["steps"], f"{where}.steps", lim)
    check_ints(g["token_ids"], f"{where}.token_ids", len(committed), 0, lim.max_token_id)
    if g["token_ids"] != committed:
        refuse(f"{where}.token_ids", "not the tokens its steps committed")
    check_stats(g["stats"], f"{where}.stats", lim)
    if "drafter_info" in g:
        check_drafter_info(g["drafter_info"], f"{where}.drafter_info", lim)


# ---------------------------------------------------------------- a race file

BUNDLE_KEYS = ("format", "version", "vanilla", "speculative", "token_texts", "image", "rivals", "measurements",
               "target_entropy")
MAX_RIVALS = 2  # drafters raced beside the main one (vanilla + 3 drafters in all)
MAX_LAYERS = 1024


def check_token_texts(t: Any, where: str, lim: TraceLimits) -> None:
    if type(t) is not dict:
        refuse(where, f"expected an object, got {type(t).__name__}")
    if len(t) > lim.max_total_nodes:
        refuse(where, f"{len(t)} entries (the limit is {lim.max_total_nodes})")
    for k, v in t.items():
        if not (type(k) is str and k.isdecimal() and len(k) <= 10 and int(k) <= lim.max_token_id):
            refuse(f"{where} (a key)", f"expected a token id, got {_short(k)}")
        if type(v) is not str or len(v) > lim.max_token_text:
            check_str(v, f"{where}.{k}", lim.max_token_text)


MEASUREMENT_KEYS = ("method", "device", "dtype", "tokens_per_s", "wall_s", "tau", "accepted_per_step")
SPREAD_KEYS = ("median", "min", "max", "p10", "p90", "n")
VERDICTS = ("faster", "slower", "within noise")


def check_spread(v: Any, where: str) -> None:
    check_keys(v, where, SPREAD_KEYS)
    for k in SPREAD_KEYS[:-1]:
        check_num(v[k], f"{where}.{k}", 0.0, 1e12)
    check_int(v["n"], f"{where}.n", 1, 10_000)


def check_measurement(m: Any, where: str) -> None:
    """One method's repeated measurement (webui.measure.as_json, plus its label): every field the page
    formats is typed, so a visitor's trace cannot break the table."""
    check_keys(m, where, MEASUREMENT_KEYS, ("label", "temperature", "same_tokens_every_run", "speedup"))
    for k in ("method", "device", "dtype", "label"):
        if k in m:
            check_str(m[k], f"{where}.{k}", 200)
    check_spread(m["tokens_per_s"], f"{where}.tokens_per_s")
    check_spread(m["wall_s"], f"{where}.wall_s")
    check_num(m["tau"], f"{where}.tau", 0.0, 1e4)
    check_num(m["accepted_per_step"], f"{where}.accepted_per_step", -1.0, 1e4)
    if "temperature" in m:
        check_num(m["temperature"], f"{where}.temperature", 0.0, 100.0)
    if m.get("same_tokens_every_run") is not None and type(m["same_tokens_every_run"]) is not bool:
        refuse(f"{where}.same_tokens_every_run", "expected true, false or null")
    if "speedup" in m:
        sp = check_keys(m["speedup"], f"{where}.speedup", ("median", "min", "max", "verdict"),
                        ("same_device_as_vanilla",))
        for k in ("median", "min", "max"):
            check_num(sp[k], f"{where}.speedup.{k}", 0.0, 1e12)
        check_choice(sp["verdict"], f"{where}.speedup.verdict", VERDICTS)
        if "same_device_as_vanilla" in sp and type(sp["same_device_as_vanilla"]) is not bool:
            refuse(f"{where}.speedup.same_device_as_vanilla", "expected true or false")


def check_bundle(d: Any, lim: TraceLimits = TraceLimits()) -> None:
    """A race file ({"format": "mmspec-race", ...}) with one or both runs."""
    check_keys(d, "trace", (), BUNDLE_KEYS)
    if "format" in d:
        check_choice(d["format"], "trace.format", ("mmspec-race",))
    if "version" in d:
        check_int(d["version"], "trace.version", 1, 1)
    for mode in ("vanilla", "speculative"):
        if d.get(mode) is not None:
            check_generation(d[mode], mode, lim)
            if d[mode]["mode"] != mode:
                refuse(f"{mode}.mode", f"the {mode} run says it is {d[mode]['mode']}")
    if d.get("token_texts") is not None:
        check_token_texts(d["token_texts"], "trace.token_texts", lim)
    if d.get("image") is not None:
        check_str(d["image"], "trace.image", lim.max_image_chars)
    for i, g in enumerate(check_list(d.get("rivals") or [], "trace.rivals", MAX_RIVALS)):
        check_generation(g, f"rivals[{i}]", lim)
        if g["mode"] != "speculative":
            refuse(f"rivals[{i}].mode", "a raced drafter's run must be speculative")
    if d.get("measurements") is not None:
        for i, m in enumerate(check_list(d["measurements"], "trace.measurements", 1 + 1 + MAX_RIVALS)):
            check_measurement(m, f"trace.measurements[{i}]")
    if d.get("target_entropy") is not None:
        check_nums(d["target_entropy"], "trace.target_entropy", MAX_LAYERS, 0.0, 1e3)
