"""Trace files: both runs of a race in one JSON, or a single `Generation` (as `save_trace` writes it).

    {"format": "mmspec-race", "version": 1, "vanilla": Generation.to_dict(), "speculative": ...,
     "token_texts": {"id": "text"}, "image": "data:image/jpeg;base64,..." (thumbnail, optional)}

Everything the visualizer draws is rebuilt from this file, no model needed.
"""
from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmspec.errors import InputError
from mmspec.trace import Generation

FORMAT = "mmspec-race"
MAX_TRACE_BYTES = 64 * 1024 * 1024


@dataclass
class Bundle:
    vanilla: Generation | None
    speculative: Generation | None
    image: Image.Image | None = None
    token_texts: dict[int, str] = field(default_factory=dict)

    @property
    def main(self) -> Generation | None:
        return self.speculative or self.vanilla


def thumbnail_uri(image: Image.Image | None, max_side: int = 384) -> str | None:
    if image is None:
        return None
    im = image.convert("RGB")
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def image_from_uri(uri: str | None) -> Image.Image | None:
    if not uri or not isinstance(uri, str) or not uri.startswith("data:image/"):
        return None
    try:
        raw = base64.b64decode(uri.split(",", 1)[1])
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 - a broken thumbnail only loses the picture
        return None


def pack(bundle: Bundle) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": 1,
        "vanilla": bundle.vanilla.to_dict() if bundle.vanilla else None,
        "speculative": bundle.speculative.to_dict() if bundle.speculative else None,
        "token_texts": {str(k): v for k, v in bundle.token_texts.items()},
        "image": thumbnail_uri(bundle.image),
    }


def _generation(d: Any, what: str) -> Generation | None:
    if d is None:
        return None
    try:
        return Generation.from_dict(d)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise InputError(f"the {what} run in this trace is malformed ({type(e).__name__}: {e})") from e


def unpack(data: Any) -> Bundle:
    if not isinstance(data, dict):
        raise InputError("not an mmspec trace: the JSON is not an object")
    if "vanilla" in data or "speculative" in data:
        van = _generation(data.get("vanilla"), "vanilla")
        spec = _generation(data.get("speculative"), "speculative")
        if van is None and spec is None:
            raise InputError("this trace holds no run")
        texts = {}
        for k, v in (data.get("token_texts") or {}).items():
            try:
                texts[int(k)] = str(v)
            except (TypeError, ValueError):
                continue
        return Bundle(van, spec, image_from_uri(data.get("image")), texts)
    if "steps" in data and "stats" in data:
        gen = _generation(data, "saved")
        return Bundle(gen, None) if gen.mode == "vanilla" else Bundle(None, gen)
    raise InputError("not an mmspec trace: expected {\"vanilla\": ..., \"speculative\": ...} or one saved Generation")


def load(path: str | Path) -> Bundle:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"trace file {p.name} does not exist")
    if p.stat().st_size > MAX_TRACE_BYTES:
        raise InputError(f"trace file is larger than {MAX_TRACE_BYTES // 2**20} MB")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p.name} is not an mmspec trace (not JSON: {e})") from e
    return unpack(data)


def save(bundle: Bundle, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(json.dumps(pack(bundle)), encoding="utf-8")
    return p
