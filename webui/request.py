"""One run request from the page or the API, parsed and checked before any work.

The run event skips Gradio's preprocessing (the handler streams and must see the raw payload), so the
image payload is checked here the way Gradio checks its own uploads: a FileData object
(meta `{"_type": "gradio.FileData"}`) whose file lies in Gradio's upload folder, or one of the
example images the app ships. Any other path is refused: the server never opens a file a visitor names.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from PIL import Image

from mmspec import DecodeConfig, InputError, load_image
from mmspec.load import MAX_IMAGE_SIDE
from mmspec.tree import TreeSpec, parse_tree_spec
from webui.policy import Limits, Policy

FILE_DATA = "gradio.FileData"
log = logging.getLogger("mmspec.app")


@dataclass(frozen=True)
class Rules:
    """What a request is checked against: limits, allowed models, where uploads live, the examples."""
    limits: Limits
    policy: Policy
    upload_dir: str  # Gradio's upload folder (gradio.utils.get_upload_folder())
    examples: frozenset[str]  # real paths of the shipped example images


@dataclass
class RunRequest:
    image_path: str
    image: Image.Image
    prompt: str
    target: str
    drafter: str  # the main drafter (the step inspector's)
    tree: str
    config: DecodeConfig
    note: str  # e.g. "image downscaled"
    rivals: tuple[str, ...] = ()  # up to 2 more drafters raced on the same prompt
    repeats: int = 3  # timed runs per method after the warm-up

    @property
    def drafters(self) -> list[str]:
        return [self.drafter, *self.rivals]

    def cache_key(self) -> tuple:
        """What makes two requests the same measurement (the image by its content)."""
        c = self.config
        return (hash_file(self.image_path), self.prompt, self.target, tuple(self.drafters), self.tree, c.temperature,
                c.top_p, c.seed, c.max_new_tokens, self.repeats)


def hash_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_examples(folder: Path | None) -> list[tuple[str, str]]:
    """(image path, prompt) of a folder's examples.json, else of its pictures with a describe prompt."""
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


def inside(path: str, folder: str) -> bool:
    """Whether `path` (links resolved) lies in `folder`."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def uploaded_file(payload: Any, upload_dir: str, examples: Collection[str] = ()) -> str | None:
    """The path of an uploaded file (or a shipped example); None when nothing was given.

    Refused: plain strings, dicts without Gradio's FileData marker, files outside the upload folder.
    """
    if payload is None or payload == "":
        return None
    path = payload.get("path") if isinstance(payload, dict) else None
    if not isinstance(path, str) or not path:
        raise InputError("The image must be uploaded through the page or the API's file upload "
                         "(gradio_client.handle_file); a server path is not accepted.")
    if os.path.realpath(path) in examples:
        return path
    meta = payload.get("meta")
    if not (isinstance(meta, dict) and meta.get("_type") == FILE_DATA) or not inside(path, upload_dir):
        raise InputError("This file was not uploaded to the app: only uploads and the shipped examples are read.")
    return path


# The draft-shape controls' ranges: the sliders, the request check and a loaded trace's settings share them.
SHAPE_LIMITS = {"chain_len": (1, 32), "budget": (1, 128), "depth": (1, 12), "topk": (1, 10)}


def _clamp(control: str, value: int) -> int:
    lo, hi = SHAPE_LIMITS[control]
    return min(max(value, lo), hi)


def shape_fits(spec: TreeSpec) -> bool:
    """Whether the controls can show this shape (a chain or a dynamic tree within SHAPE_LIMITS)."""
    if spec.kind == "chain":
        return _clamp("chain_len", spec.depth) == spec.depth
    return spec.kind == "dynamic" and all(_clamp(n, getattr(spec, n)) == getattr(spec, n)
                                          for n in ("budget", "depth", "topk"))


def tree_spec(shape: str, chain_len, budget, depth, topk) -> str:
    try:
        chain = str(shape).startswith("chain")
        values = (int(chain_len),) if chain else (int(budget), int(depth), int(topk))
    except (TypeError, ValueError, OverflowError) as e:
        raise InputError(f"draft shape: expected whole numbers ({e})") from e
    spec = TreeSpec("chain", depth=values[0]) if chain else TreeSpec("dynamic", depth=values[1], topk=values[2],
                                                                      budget=values[0])
    if not shape_fits(spec):
        lo_hi = {n: f"{a}-{b}" for n, (a, b) in SHAPE_LIMITS.items()}
        raise InputError(f"chain length must be {lo_hi['chain_len']}" if chain else
                         f"tree: budget {lo_hi['budget']}, depth {lo_hi['depth']}, top-k {lo_hi['topk']}")
    return spec.describe()


def _sampling(max_tokens, temperature, top_p, seed, limit: int) -> tuple[int, float, float, int]:
    try:
        max_tokens, temperature, top_p, seed = int(max_tokens), float(temperature), float(top_p), int(seed)
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
        raise InputError(f"sampling settings must be numbers ({e})") from e
    if not 1 <= max_tokens <= limit:
        raise InputError(f"max new tokens must be between 1 and {limit} in this app.")
    if not 0.0 <= temperature <= 2.0:  # NaN fails every comparison: refused here too
        raise InputError("temperature must be between 0 and 2.")
    if not 0.0 < top_p <= 1.0:
        raise InputError("top-p must be in (0, 1].")
    if not 0 <= seed < 2**63:
        raise InputError("seed must be between 0 and 2**63 - 1.")
    return max_tokens, temperature, top_p, seed


def open_image(path: str, limits: Limits) -> tuple[Image.Image, str]:
    """The image (downscaled past MAX_IMAGE_SIDE, with a note), refused past the byte / pixel limits."""
    size_bytes = Path(path).stat().st_size
    if size_bytes > limits.max_image_bytes:
        raise InputError(f"The image has {size_bytes / 2**20:.1f} MB; "
                         f"the limit is {limits.max_image_bytes / 2**20:g} MB.")
    try:
        with Image.open(path) as im:  # reads the header only
            size = im.size
        if size[0] * size[1] > limits.max_image_pixels:
            raise InputError(f"The image has {size[0]}×{size[1]} pixels; the limit is "
                             f"{limits.max_image_pixels / 1e6:g} megapixels.")
        img = load_image(path)
    except Image.DecompressionBombError as e:
        raise InputError(f"The image is too large to open safely ({e}).") from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL can't identify it
        if isinstance(e, InputError):
            raise
        raise InputError(f"That file is not a readable image ({type(e).__name__}).") from e
    note = ""
    if img.size != size:
        note = (f"image downscaled from {size[0]}×{size[1]} to {img.width}×{img.height} "
                f"(limit {MAX_IMAGE_SIDE} px per side)")
    return img, note


def rivals_of(drafter: str, rivals, repeats, max_rivals: int = 2) -> tuple[tuple[str, ...], int]:
    """The extra drafters (a list of names; the main one and repeats dropped) and the repeat count."""
    if rivals is None or rivals == "":
        rivals = []
    if isinstance(rivals, str):
        rivals = [rivals]
    if not isinstance(rivals, (list, tuple)) or not all(isinstance(r, str) for r in rivals):
        raise InputError("The drafters to race must be a list of names.")
    out = tuple(dict.fromkeys(r.strip() for r in rivals if r.strip() and r.strip() != drafter))
    if any(r in ("vanilla", "none") for r in out):
        raise InputError("Vanilla decoding is always measured as the baseline: race drafters against it.")
    if len(out) > max_rivals:
        raise InputError(f"Race at most {max_rivals + 1} drafters at once (vanilla is always the baseline).")
    try:
        repeats = int(repeats)
    except (TypeError, ValueError, OverflowError) as e:
        raise InputError(f"timed runs must be a whole number ({e})") from e
    if not 3 <= repeats <= 10:
        raise InputError("timed runs per method must be between 3 and 10 (a median needs at least 3).")
    return out, repeats


def parse_request(rules: Rules, image, prompt, target, drafter, shape, chain_len, budget, depth, topk,
                  temperature, top_p, seed, max_tokens, rivals=(), repeats=3) -> RunRequest:
    """Every setting checked (cheap checks first), then the image opened; InputError on the first problem."""
    limits = rules.limits
    prompt = (prompt if isinstance(prompt, str) else "").strip()
    if not prompt:
        raise InputError("The prompt is empty: type a question or instruction about the image.")
    if len(prompt) > limits.max_prompt_chars:
        raise InputError(f"The prompt is too long ({len(prompt)} characters; the limit is {limits.max_prompt_chars}).")
    target = (target if isinstance(target, str) else "").strip()
    if not target:
        raise InputError("No target model: enter a hub id or a local model directory.")
    drafter = (drafter if isinstance(drafter, str) else "").strip()
    if not drafter or drafter in ("vanilla", "none"):
        raise InputError("Pick a speculative drafter (vanilla decoding is always run as the baseline).")
    rules.policy.check(target, drafter)
    rival_names, repeats = rivals_of(drafter, rivals, repeats)
    for r in rival_names:
        rules.policy.check(target, r)
    max_tokens, temperature, top_p, seed = _sampling(max_tokens, temperature, top_p, seed, limits.max_new_tokens)
    tree = tree_spec(shape, chain_len, budget, depth, topk)
    path = uploaded_file(image, rules.upload_dir, rules.examples)
    if not path:
        raise InputError("No image: upload one or pick an example.")
    img, note = open_image(path, limits)
    config = DecodeConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, tree=tree)
    config.check()
    return RunRequest(path, img, prompt, target, drafter, tree, config, note, rival_names, repeats)


def _num(value, lo: float, hi: float, default: float) -> float:
    """A number from a trace's free-form config, clamped to a control's range (default when not a number)."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return min(max(x, lo), hi) if x == x else default


def trace_settings(config: dict, prompt: str, drafters: list[str], token_limit: int,
                   allowed: Collection[str] | None = None) -> dict[str, Any]:
    """A replayed trace's settings as the page's control values, by control name. A trace is a visitor's
    file: every number is clamped to its control's range, a shape the controls cannot show is left out,
    and with `allowed` (public mode) so is a drafter not in the list."""
    out: dict[str, Any] = {
        "prompt": prompt, "temperature": _num(config.get("temperature"), 0.0, 2.0, 0.0),
        "top_p": _num(config.get("top_p"), 0.05, 1.0, 1.0), "seed": int(_num(config.get("seed"), 0, 2**53, 0)),
        "max_tokens": int(_num(config.get("max_new_tokens"), 1, token_limit, min(64, token_limit)))}
    names = [n for n in drafters if allowed is None or n in allowed]
    if names:
        out.update(drafter=names[0], rivals=names[1:])
    try:
        shape = parse_tree_spec(str(config.get("tree", "")))
    except (ValueError, InputError):
        return out
    if shape.kind == "chain":
        out.update(shape="chain", chain_len=_clamp("chain_len", shape.depth))
    elif shape.kind == "dynamic":
        out.update(shape="tree (dynamic)", **{n: _clamp(n, getattr(shape, n)) for n in ("budget", "depth", "topk")})
    return out
