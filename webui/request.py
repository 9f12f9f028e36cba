"""One run request from the page or the API, parsed and checked before any work.

The run event skips Gradio's preprocessing (the handler streams and must see the raw payload), so the
image payload is checked here the way Gradio checks its own uploads: a FileData object
(meta `{"_type": "gradio.FileData"}`) whose file lies in Gradio's upload folder, or one of the
example images the app ships. Any other path is refused: the server never opens a file a visitor names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from PIL import Image

from mmspec import DecodeConfig, InputError, load_image
from mmspec.load import MAX_IMAGE_SIDE
from webui.policy import Limits, Policy

FILE_DATA = "gradio.FileData"


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
    drafter: str
    tree: str
    config: DecodeConfig
    note: str  # e.g. "image downscaled"


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


def tree_spec(shape: str, chain_len, budget, depth, topk) -> str:
    try:
        if str(shape).startswith("chain"):
            k = int(chain_len)
            if not 1 <= k <= 16:
                raise InputError("chain length must be between 1 and 16")
            return f"chain:{k}"
        b, d, k = int(budget), int(depth), int(topk)
    except (TypeError, ValueError, OverflowError) as e:
        raise InputError(f"draft shape: expected whole numbers ({e})") from e
    if not (1 <= b <= 128 and 1 <= d <= 12 and 1 <= k <= 10):
        raise InputError("tree: budget 1-128, depth 1-12, top-k 1-10")
    return f"dynamic:{b},{d},{k}"


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


def parse_request(rules: Rules, image, prompt, target, drafter, shape, chain_len, budget, depth, topk,
                  temperature, top_p, seed, max_tokens) -> RunRequest:
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
    max_tokens, temperature, top_p, seed = _sampling(max_tokens, temperature, top_p, seed, limits.max_new_tokens)
    tree = tree_spec(shape, chain_len, budget, depth, topk)
    path = uploaded_file(image, rules.upload_dir, rules.examples)
    if not path:
        raise InputError("No image: upload one or pick an example.")
    img, note = open_image(path, limits)
    config = DecodeConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, tree=tree)
    config.check()
    return RunRequest(path, img, prompt, target, drafter, tree, config, note)
