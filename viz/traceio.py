"""Trace files: both runs of a race in one JSON, or a single `Generation` (as `save_trace` writes it).

    {"format": "mmspec-race", "version": 1, "vanilla": Generation.to_dict(), "speculative": ...,
     "token_texts": {"id": "text"}, "image": "data:image/jpeg;base64,..." (thumbnail, optional),
     "rivals": [Generation.to_dict(), ...] (up to 2 more drafters raced on the same prompt),
     "measurements": [webui.measure.as_json(...), ...] (medians and spreads, vanilla first),
     "target_entropy": [per-layer attention entropy of the target on this prompt]}  (the last three optional)

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
from viz.schema import TraceLimits, check_bundle, check_generation

FORMAT = "mmspec-race"
MAX_THUMBNAIL_SIDE = 2048  # a thumbnail claiming more pixels is dropped before it is decoded


@dataclass
class Bundle:
    vanilla: Generation | None
    speculative: Generation | None
    image: Image.Image | None = None
    token_texts: dict[int, str] = field(default_factory=dict)
    rivals: list[Generation] = field(default_factory=list)  # drafters raced beside `speculative`
    measurements: list[dict] = field(default_factory=list)  # webui.measure.as_json, vanilla first
    target_entropy: list[float] | None = None  # the target's attention entropy per layer on this prompt

    @property
    def main(self) -> Generation | None:
        return self.speculative or self.vanilla

    @property
    def drafted(self) -> list[Generation]:
        """Every speculative run: the main drafter's, then its rivals'."""
        return [g for g in [self.speculative, *self.rivals] if g is not None]


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
            if max(im.size) > MAX_THUMBNAIL_SIDE:  # its header is read, not its pixels: no bomb
                return None
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
        "rivals": [g.to_dict() for g in bundle.rivals],
        "measurements": bundle.measurements,
        "target_entropy": bundle.target_entropy,
    }


def _generation(d: Any) -> Generation | None:
    # Only called on data that viz.schema accepted: from_dict cannot fail on it.
    return None if d is None else Generation.from_dict(d)


def unpack(data: Any, limits: TraceLimits = TraceLimits()) -> Bundle:
    """A Bundle from parsed JSON, after viz.schema has checked every value in it."""
    if not isinstance(data, dict):
        raise InputError("not an mmspec trace: the JSON is not an object")
    if "vanilla" in data or "speculative" in data:
        check_bundle(data, limits)
        van, spec = _generation(data.get("vanilla")), _generation(data.get("speculative"))
        if van is None and spec is None:
            raise InputError("this trace holds no run")
        texts = {int(k): v for k, v in (data.get("token_texts") or {}).items()}
        rivals = [Generation.from_dict(g) for g in data.get("rivals") or []]
        return Bundle(van, spec, image_from_uri(data.get("image")), texts, rivals, list(data.get("measurements") or []),
                      data.get("target_entropy"))
    if "steps" in data and "stats" in data:
        check_generation(data, "trace", limits)
        gen = _generation(data)
        return Bundle(gen, None) if gen.mode == "vanilla" else Bundle(None, gen)
    raise InputError("not an mmspec trace: expected {\"vanilla\": ..., \"speculative\": ...} or one saved Generation")


def _no_constant(name: str):
    raise InputError(f"this trace is malformed: it holds {name}, which is not a number JSON allows")


def parse(raw: bytes, name: str = "the trace") -> Any:
    """JSON without NaN / Infinity; nesting too deep or integers too long are refused too."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError as e:
        raise InputError(f"{name} is not an mmspec trace (nested too deeply)") from e
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and ints over Python's digit limit
        if isinstance(e, InputError):
            raise
        raise InputError(f"{name} is not an mmspec trace (not JSON: {str(e)[:200]})") from e


def load(path: str | Path, limits: TraceLimits = TraceLimits()) -> Bundle:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"trace file {p.name} does not exist")
    size = p.stat().st_size
    if size > limits.max_bytes:
        raise InputError(f"the trace file has {size / 2**20:.1f} MB; the limit is {limits.max_bytes / 2**20:g} MB")
    return unpack(parse(p.read_bytes(), p.name), limits)


def save(bundle: Bundle, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(json.dumps(pack(bundle)), encoding="utf-8")
    return p
