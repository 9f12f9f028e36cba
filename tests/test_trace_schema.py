"""viz.schema: real traces pass; crafted ones are refused quickly with one message (viz.traceio.load)."""
from __future__ import annotations

import copy
import json
import time

import pytest

import crafted
from mmspec import InputError
from mmspec.load import ASSETS
from viz import traceio
from viz.schema import TraceLimits


@pytest.fixture(scope="module")
def race(tiny_dir):
    return crafted.real_race(tiny_dir)


def load_dict(tmp_path, data, limits=TraceLimits()):
    return traceio.load(crafted.write(tmp_path / "t.json", data), limits)


def test_real_traces_pass(race, tmp_path):
    b = load_dict(tmp_path, race)
    assert b.speculative.steps[1].extras["visual_map"]["grid"] == [2, 3]
    single = load_dict(tmp_path, race["speculative"])  # one saved Generation
    assert single.vanilla is None and single.speculative.token_ids == race["speculative"]["token_ids"]
    for payload in crafted.PAYLOADS:  # text may hold anything: it is escaped where it is drawn
        assert load_dict(tmp_path, crafted.poisoned(race, payload)).speculative is not None


def _step(race, i=1):
    return race["speculative"]["steps"][i]


def _first_draft(race):
    return next(s for s in race["speculative"]["steps"] if len(s["tree"]["tokens"]) > 1)


def _deep_node(race):
    return next(i for i, p in enumerate(_first_draft(race)["tree"]["parents"]) if p != -1)


MUTATIONS = {
    "self-parent cycle": (lambda r: _first_draft(r)["tree"]["parents"].__setitem__(0, 0), "parent must come before"),
    "later parent": (lambda r: _first_draft(r)["tree"]["parents"].__setitem__(0, 1), "parent must come before"),
    "depth inconsistent": (lambda r: _first_draft(r)["tree"]["depths"].__setitem__(0, 3), "does not follow"),
    "depth as text": (lambda r: _first_draft(r)["tree"]["depths"].__setitem__(0, "<img src=x>"), "whole number"),
    "index as text": (lambda r: r["vanilla"]["steps"][1].__setitem__("index", "<img src=x>"), "whole number"),
    "index out of order": (lambda r: r["vanilla"]["steps"][1].__setitem__("index", 7), "outside"),
    "token id as text": (lambda r: r["vanilla"]["token_ids"].__setitem__(0, "<b>"), "whole number"),
    "token ids not committed": (lambda r: r["vanilla"]["token_ids"].append(3), "entries"),
    "huge token id": (lambda r: r["vanilla"]["steps"][0]["new_tokens"].__setitem__(0, 2**70), "outside"),
    "bool as int": (lambda r: r["vanilla"]["steps"][0].__setitem__("next_token", True), "whole number"),
    "float as int": (lambda r: r["vanilla"]["stats"].__setitem__("steps", 3.0), "whole number"),
    "1e308 time": (lambda r: r["vanilla"]["stats"].__setitem__("wall_s", 1e308), "outside"),
    "negative time": (lambda r: _step(r).__setitem__("draft_ms", -1.0), "outside"),
    "time backwards": (lambda r: r["vanilla"]["steps"][-1].__setitem__("elapsed_s", 0.0), "backwards"),
    "prob above 1": (lambda r: _first_draft(r)["tree"]["draft_probs"].__setitem__(0, 1.5), "outside"),
    "short parallel list": (lambda r: _first_draft(r)["node_texts"].pop(), "entries where"),
    "accepted not a path": (lambda r: _first_draft(r).__setitem__("accepted", [_deep_node(r)]), "not a child"),
    "grid [1, 250000]": (lambda r: _step(r)["extras"]["visual_map"].__setitem__("grid", [1, 250000]), "outside"),
    "grid too many cells": (lambda r: _step(r)["extras"]["visual_map"].__setitem__("grid", [200, 200]), "cells"),
    "unknown status": (lambda r: _step(r)["extras"]["visual_map"]["status"].__setitem__(0, "<i>"), "one of"),
    "unknown field": (lambda r: r["vanilla"].__setitem__("evil", 1), "unknown field"),
    "missing field": (lambda r: r["vanilla"].pop("stats"), "missing field"),
    "steps not a list": (lambda r: r["vanilla"].__setitem__("steps", {"a": 1}), "expected a list"),
    "wrong mode": (lambda r: r["vanilla"].__setitem__("mode", "speculative"), "says it is"),
    "long token text": (lambda r: _step(r)["new_texts"].__setitem__(0, "x" * 5000), "characters"),
    "deep extras": (lambda r: _step(r)["extras"].__setitem__("deep", json.loads("[" * 50 + "]" * 50)), "nested"),
    "big seed": (lambda r: r["vanilla"]["config"].__setitem__("seed", 2**64), "outside"),
    "temperature as text": (lambda r: r["vanilla"]["config"].__setitem__("temperature", "hot"), "a number"),
    "bad token_texts key": (lambda r: r["token_texts"].__setitem__("-1", "x"), "token id"),
    "chosen layer out of range": (lambda r: r["speculative"]["drafter_info"].__setitem__("chosen_layers", [-1]),
                                  "outside"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_crafted_traces_are_refused(race, tmp_path, name):
    bad = copy.deepcopy(race)
    mutate, message = MUTATIONS[name]
    mutate(bad)
    with pytest.raises(InputError, match=message):
        load_dict(tmp_path, bad)


@pytest.mark.parametrize("text, message", [
    ('{"vanilla": NaN}', "NaN"), ('{"a": Infinity}', "Infinity"), ('{"a": -Infinity}', "-Infinity"),
    ('{"a": ' + "9" * 5000 + "}", "not JSON"), ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("\xff\xfe", "not JSON"), ("[1, 2]", "not an object"),
])
def test_bad_json_is_refused(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        load_dict(tmp_path, text)


def test_nan_time_is_refused(race, tmp_path):
    text = json.dumps(race).replace('"wall_s": ', '"wall_s": NaN, "x": ', 1)
    with pytest.raises(InputError, match="NaN"):
        load_dict(tmp_path, text)


def test_total_extras_bounded(race, tmp_path):
    """Every step may carry a visual map: their cells count towards one budget for the whole trace."""
    with pytest.raises(InputError, match="values in the steps' extras"):
        load_dict(tmp_path, race, TraceLimits(max_total_extras=10))
    load_dict(tmp_path, race, TraceLimits(max_total_extras=100))  # 6 cells + 3 values: fine


def test_many_steps_and_size_refused_quickly(race, tmp_path):
    """150k steps (a 60 MB file) are refused by size before reading; past the step limit, by count before
    any step is checked."""
    van = race["vanilla"]
    step = van["steps"][-1]
    many = dict(van, steps=[dict(step, index=i) for i in range(150_000)])
    path = crafted.write(tmp_path / "many.json", {"vanilla": many})
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="the limit is 32 MB"):
        traceio.load(path)
    assert time.perf_counter() - t0 < 1.0  # fixed bound; it reads only the file's size
    few = crafted.write(tmp_path / "few.json", {"vanilla": dict(van, steps=many["steps"][:5000])})
    with pytest.raises(InputError, match="5000 entries"):
        traceio.load(few, TraceLimits(max_steps=1000))


@pytest.mark.slow
@pytest.mark.skipif(not (ASSETS / "models" / "mmspec-target").exists(), reason="the embedded models are not built")
def test_traces_of_every_embedded_drafter_pass():
    """The schema accepts what the engine writes for each embedded drafter (visual maps, saliency, info)."""
    from mmspec import DecodeConfig, generate, load_drafter, load_image, load_target

    target = load_target(str(ASSETS / "models" / "mmspec-target"))
    img = load_image(str(ASSETS / "examples" / "example_1_describe.png"))
    cfg = DecodeConfig(max_new_tokens=6, tree="dynamic:16,4,3")
    van = generate(target, None, img, "Describe the image.", cfg)
    for folder in sorted((ASSETS / "models").glob("mmspec-*")):
        if folder.name == "mmspec-target":
            continue
        spec = generate(target, load_drafter(str(folder), target), img, "Describe the image.", cfg)
        data = json.loads(json.dumps(traceio.pack(traceio.Bundle(van, spec, img, {}))))
        assert traceio.unpack(data).speculative.token_ids == spec.token_ids, folder.name


def _with_measurements(race):
    """The race as the app saves it now: medians and spreads of every method, and a raced rival."""
    spread = {"median": 40.0, "min": 38.0, "max": 44.0, "p10": 38.5, "p90": 43.0, "n": 3}
    base = {"method": "vanilla", "label": "vanilla", "device": "cpu", "dtype": "float32", "temperature": 0.0,
            "tokens_per_s": spread, "wall_s": {**spread, "median": 0.4, "min": 0.3, "max": 0.5, "p10": 0.3, "p90": 0.5},
            "tau": 1.0, "accepted_per_step": 0.0, "same_tokens_every_run": True}
    drafter = {**copy.deepcopy(base), "method": "random", "label": "random <b>",
               "speedup": {"median": 0.9, "min": 0.8, "max": 1.1, "verdict": "within noise",
                           "same_device_as_vanilla": True}}
    out = copy.deepcopy(race)
    out["measurements"] = [base, drafter, copy.deepcopy(drafter)]
    out["rivals"] = [copy.deepcopy(race["speculative"])]
    return out


MEASURED_MUTATIONS = {
    "tau as text": (lambda r: r["measurements"][1].__setitem__("tau", "fast"), "a number"),
    "unknown verdict": (lambda r: r["measurements"][1]["speedup"].__setitem__("verdict", "<b>best</b>"), "one of"),
    "spread without n": (lambda r: r["measurements"][0]["tokens_per_s"].pop("n"), "missing field"),
    "negative median": (lambda r: r["measurements"][0]["wall_s"].__setitem__("median", -1.0), "outside"),
    "unknown measurement field": (lambda r: r["measurements"][0].__setitem__("x", 1), "unknown field"),
    "too many measurements": (lambda r: r["measurements"].extend([r["measurements"][0]] * 2), "entries"),
    "vanilla rival": (lambda r: r["rivals"].__setitem__(0, r["vanilla"]), "must be speculative"),
    "too many rivals": (lambda r: r["rivals"].extend([r["rivals"][0]] * 2), "entries"),
    "entropy as text": (lambda r: r.__setitem__("target_entropy", ["0.5"]), "a number"),
}


def test_measured_races_pass_and_their_numbers_are_typed(race, tmp_path):
    """A saved race carries medians, spreads and rivals; every number the page formats is checked, so a
    visitor's trace cannot break the numbers table or the race panes."""
    good = _with_measurements(race)
    good["target_entropy"] = [0.5, 0.25, 0.75]
    b = load_dict(tmp_path, good)
    assert len(b.rivals) == 1 and b.measurements[1]["speedup"]["verdict"] == "within noise"
    assert b.target_entropy == [0.5, 0.25, 0.75]
    for name, (mutate, message) in MEASURED_MUTATIONS.items():
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(InputError, match=message):
            load_dict(tmp_path, bad)
