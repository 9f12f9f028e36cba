"""A saved feature drafter: a directory with mmspec_drafter.json (format, config, target
fingerprint, training record) and model.safetensors (the drafter's own weights; the target's
embeddings, final norm and LM head are never saved). Save, load (every config field type- and
range-checked against the target, a drafter trained for another target refused), recognise.
The retired eagle3 variant (a feature drafter fusing three target layers, which stood in for EAGLE-3
before mmspec's EAGLE-3 drafter became a vLLM / SGLang format head) is refused by name."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from mmspec.drafters.feature.drafter import FeatureDrafter
from mmspec.drafters.feature.net import FeatConfig, FeatNet, Shared, make_config, size_report, text_config
from mmspec.errors import InputError

FORMAT = "mmspec-feature-drafter"
FORMAT_VERSION = 1
META_FILE = "mmspec_drafter.json"
WEIGHTS_FILE = "model.safetensors"
RETIRED_VARIANT = "eagle3"


def retired_message(path) -> str:
    """One line for a saved retired-eagle3 feature drafter: what it is and how to get the format head."""
    return (f"{path} is mmspec's retired pre-format eagle3 drafter (a feature drafter fusing three target layers, "
            "not the EAGLE-3 format); mmspec's EAGLE-3 drafter is now a vLLM / SGLang format head: use "
            "assets/models/mmspec-feat-eagle3, or train one with `python -m mmspec.train_eagle3 --out DIR` "
            "(`python -m mmspec export-eagle3 DIR OUT` exports it)")


def is_retired(meta: dict) -> bool:
    """Whether a feature-drafter file is the retired eagle3 variant (marked by its variant, or by the
    fused-feature switch of its config)."""
    cfg = meta.get("config")
    cfg = cfg if isinstance(cfg, dict) else {}
    return RETIRED_VARIANT in (meta.get("variant"), cfg.get("variant")) or cfg.get("fuse3") is True


def target_fingerprint(model) -> dict[str, Any]:
    tc = text_config(model)
    w = model.get_output_embeddings().weight.detach()[:16].float().cpu()
    bits = (w > 0).to(torch.uint8).numpy().tobytes()  # signs survive any dtype cast
    return {
        "model_type": model.config.model_type, "hidden_size": tc.hidden_size, "num_layers": tc.num_hidden_layers,
        "vocab_size": tc.vocab_size, "lm_head_sign_sha": hashlib.sha256(bits).hexdigest()[:16],
    }


def save_feature_drafter(drafter: FeatureDrafter, path: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    net = drafter.net
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    meta = dict(drafter.meta)
    meta.update({
        "format": FORMAT, "version": FORMAT_VERSION, "variant": net.cfg.variant, "config": asdict(net.cfg),
        "target": target_fingerprint(drafter.target.model), **size_report(net), **(extra or {}),
    })
    (path / META_FILE).write_text(json.dumps(meta, indent=2))
    return path


def load_feature_drafter(path: str | Path, target) -> FeatureDrafter:
    path = Path(path)
    meta = _read_meta(path)
    want, have = meta.get("target"), target_fingerprint(target.model)
    if not isinstance(want, dict):
        raise InputError(f"{path}/{META_FILE} has no 'target' object: cannot tell which target it was trained for")
    diff = [k for k in have if want.get(k) != have[k]]
    if diff:
        raise InputError(
            f"feature drafter {path} was trained for another target: "
            + ", ".join(f"{k} {want.get(k)!r} (this target: {have[k]!r})" for k in diff)
            + ". A feature drafter reads the target's hidden states and shares its LM head; use one trained for this target."
        )
    cfg = _checked_config(meta.get("config"), target, path)
    try:
        net = FeatNet(cfg, Shared(target.model))
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        raise InputError(f"{path}: cannot build a drafter from its config ({type(e).__name__}: {e})") from e
    _load_weights(net, path)
    net = net.to(target.device, target.dtype).eval()
    return FeatureDrafter(net, target, name=str(meta.get("name") or path.name), meta=meta)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise InputError(f"{path} is not a feature drafter: cannot read {META_FILE} ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{path}/{META_FILE} is not an mmspec feature-drafter file")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(f"{path}/{META_FILE}: 'version' is not an integer")
    if version > FORMAT_VERSION:
        raise InputError(f"{path} was written by a newer mmspec (format {version})")
    if is_retired(meta):
        raise InputError(retired_message(path))
    return meta


# Fields copied from the target when a drafter is made: a saved config must agree with this target.
_TARGET_SIZED = ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "target_layers_n", "vocab")
# The largest architecture a saved config may ask for: a crafted file must not make the loader
# allocate a thousand layers. (low, high) inclusive.
_CONFIG_RANGES = {"n_layers": (1, 16), "flash": (1, 16), "queries": (0, 4096), "pool": (1, 64), "unroll": (1, 64)}
_COMPRESS = ("none", "pool", "topk", "queries")


def _checked_config(raw, target, path: Path) -> FeatConfig:
    """The saved config as a FeatConfig, every field type- and range-checked against this target."""
    if not isinstance(raw, dict):
        raise InputError(f"{path}/{META_FILE}: 'config' is not an object")
    sized = make_config("eagle", target.model)  # this target's sizes; other fields at their defaults
    values = {f.name: _checked_field(f.name, raw[f.name], getattr(sized, f.name), path)
              for f in fields(FeatConfig) if f.name in raw}
    cfg = replace(sized, **values)
    for k in _TARGET_SIZED:
        if getattr(cfg, k) != getattr(sized, k):
            raise InputError(f"{path}: config {k}={getattr(cfg, k)} does not match this target's {getattr(sized, k)}")
    for k, (lo, hi) in _CONFIG_RANGES.items():
        if not lo <= getattr(cfg, k) <= hi:
            raise InputError(f"{path}: config {k}={getattr(cfg, k)} is outside [{lo}, {hi}]")
    L = cfg.target_layers_n
    layers_ok = (all(-L <= i < L for i in (*cfg.dream_layers, cfg.aasd_layer)) and len(cfg.dream_layers) <= L
                 and -1 <= cfg.dream_super < L and (len(cfg.dream_layers) > 0 or not cfg.dream))
    if not layers_ok or cfg.compress not in _COMPRESS or not 0 < cfg.topk_keep <= 1:
        raise InputError(f"{path}: config names target layers or options this target does not have")
    return cfg


def _checked_field(name: str, value, default, path: Path):
    """`value` if it has the type of `default` (JSON lists become tuples), else an InputError."""
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
        ok = all(type(x) is int for x in value)
    elif isinstance(default, float):
        ok = type(value) in (int, float) and math.isfinite(value)
    else:  # bool, int and str must match exactly (True is not a layer count)
        ok = type(value) is type(default)
    if not ok:
        raise InputError(f"{path}: config field {name} has a value of the wrong type ({str(value)[:40]})")
    return value


def _load_weights(net: FeatNet, path: Path) -> None:
    from safetensors.torch import load_file

    if not (path / WEIGHTS_FILE).is_file():
        raise InputError(f"{path} lacks {WEIGHTS_FILE}")
    try:
        missing, unexpected = net.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=False)
    except Exception as e:  # noqa: BLE001 - safetensors' own error on a damaged file; torch's on a shape mismatch
        raise InputError(f"{path}/{WEIGHTS_FILE} cannot be loaded ({type(e).__name__}: {str(e)[:200]})") from e
    if missing or unexpected:
        raise InputError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def is_feature_drafter(path) -> bool:
    """A directory with mmspec_drafter.json. A retired eagle3 one is refused here (InputError), so that
    the CLI names it before any target loads."""
    try:
        found = (Path(path) / META_FILE).is_file()
    except (OSError, TypeError):
        return False
    if found:
        try:
            meta = json.loads((Path(path) / META_FILE).read_text())
        except (OSError, ValueError, RecursionError):
            return True  # loading says what is wrong with the file
        if isinstance(meta, dict) and meta.get("format") == FORMAT and is_retired(meta):
            raise InputError(retired_message(path))
    return found
