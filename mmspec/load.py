"""Loading targets, draft models, processors and images, with errors a user can act on.

Everything loads through transformers' Auto classes from a local directory or a hub id, so the
embedded default in assets/ and a hub model take the same path. The processor is the family's
(families.py): its PIL image processor and no video processor, so torchvision is never needed.
A loading error names its cause; only a hub id that could not be fetched mentions being offline.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from mmspec.errors import InputError
from mmspec.families import Family, family_for
from mmspec.model import execution_device

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_TARGET = ASSETS / "models" / "mmspec-target"
MAX_IMAGE_SIDE = 2048  # larger images are downscaled (aspect kept) before the processor sees them
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 64 * 10**6  # refused before decoding: a 64-megapixel RGB image is ~190 MB in memory


@dataclass
class Target:
    name: str
    model: Any
    processor: Any
    tokenizer: Any
    family: Family
    device: torch.device
    dtype: torch.dtype

    @property
    def eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id if self.model.generation_config else None
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return set(ids if isinstance(ids, (list, tuple)) else [ids]) - {None}


def resolve_device(device: str | None) -> torch.device:
    """cpu, cuda or cuda:N (N a GPU this machine has); anything else is refused here, not deep in torch."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"unknown device {str(device)[:60]!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise InputError(f"device {str(device)[:60]!r} is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but this machine has no CUDA GPU")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise InputError(f"unknown dtype {str(dtype)[:60]!r}: use one of {', '.join(table)}")
    return table[dtype]


def _where(name: str) -> str:
    try:
        path = Path(name).expanduser()
        exists = path.exists()
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a NUL byte, an unknown ~user
        raise InputError(f"{str(name)[:80]!r} is not a usable model path or hub id ({type(e).__name__})") from e
    if exists:
        if not path.is_dir():
            raise InputError(f"{name} is a file; a model is a directory written by save_pretrained")
        if not (path / "config.json").is_file():
            raise InputError(f"{name} is a directory without config.json: not a save_pretrained model")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise InputError(f"model path {name} does not exist")
    return name  # a hub id


def _load_error(name: str, err: Exception) -> InputError:
    """One line naming the cause; the offline hint only for a hub id (a local directory needs none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = f"{type(err).__name__}: {lines[0][:300]}" if lines else repr(err)
    hint = "" if Path(name).expanduser().exists() else (
        " If this is a hub id, this machine may be offline: use a local directory written by save_pretrained.")
    return InputError(f"could not load {name!r}: {reason}.{hint}")


def load_config(name: str):
    from transformers import AutoConfig

    where = _where(name)
    try:
        return AutoConfig.from_pretrained(where)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise _load_error(name, e) from e


def load_processor(name: str, config=None, family: Family | None = None):
    """The family's processor (a tokenizer for a text-only model)."""
    where = _where(name)
    config = config or load_config(name)
    family = family or family_for(config)
    try:
        return family.load_processor(where, config)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _load_error(name, e) from e


def load_model(name: str, device: torch.device, dtype: torch.dtype, config=None, split: dict | None = None):
    """A model on `device`, or split by accelerate when `split` holds `device_map` (e.g. "auto") and
    optionally `max_memory` / `offload_folder`: layers spread over GPUs, the CPU or the disk."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    where = _where(name)
    config = config or load_config(name)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(where, dtype=dtype, **(split or {}))
    except Exception as e:  # noqa: BLE001
        raise _load_error(name, e) from e
    return model.eval() if split else model.to(device).eval()


def load_target(name: str | None = None, device: str | None = None, dtype: str | None = None,
                device_map: str | dict | None = None, max_memory: dict | None = None,
                offload_folder: str | None = None, family: str | None = None) -> Target:
    """Load a target VLM (default: the embedded model in assets/). With `device_map` the target is
    split by accelerate; `device` is then where its inputs go (the first module's device). `family`
    forces an adapter by name (families.BY_NAME) instead of the one for the config's model type."""
    if name is None:
        if not DEFAULT_TARGET.exists():
            raise InputError(f"no --target given and the embedded default {DEFAULT_TARGET} is missing")
        name = str(DEFAULT_TARGET)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cuda":
        # Decoding changes the key length every step; cuDNN attention builds a plan per new shape
        # (about 2 ms each on an H100, measured), more than the whole forward of a small target.
        torch.backends.cuda.enable_cudnn_sdp(False)
    config = load_config(name)
    if not hasattr(config, "vision_config"):
        raise InputError(f"{name} is a text-only model ({config.model_type}); the target must be a vision-language model")
    fam = family_for(config, family)
    processor = load_processor(name, config, fam)
    split = None
    if device_map is not None:
        split = {"device_map": device_map, "max_memory": max_memory}
        if offload_folder:
            split["offload_folder"] = offload_folder
    model = load_model(name, dev, dt, config, split)
    if split:
        dev = execution_device(model)
    return Target(name, model, processor, processor.tokenizer, fam, dev, dt)


def load_image(image: str | Path | Image.Image | None) -> Image.Image:
    """An RGB PIL image, downscaled if a side exceeds MAX_IMAGE_SIDE."""
    if image is None:
        raise InputError("no image given")
    if not isinstance(image, Image.Image):
        image = _read_image(Path(image))
    image = image.convert("RGB")
    if max(image.size) > MAX_IMAGE_SIDE:
        scale = MAX_IMAGE_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return image


def _read_image(path: Path) -> Image.Image:
    """Decode a user's file, refusing what is not a regular file, too big on disk or in pixels."""
    try:
        if not path.is_file():
            raise InputError(f"image {str(path)[:200]} does not exist or is not a regular file")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise InputError(f"image {path} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
        with Image.open(path) as im:
            # The header gives the size: a small file may declare billions of pixels (a decompression bomb).
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise InputError(f"image {path} has {im.width}x{im.height} pixels; the limit is "
                                 f"{MAX_IMAGE_PIXELS // 10**6} million")
            return im.convert("RGB")
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{path} has too many pixels to open safely ({e})") from e
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path} is not a readable image ({e})") from e
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise many types (SyntaxError, ValueError, ...) on damaged files
        raise InputError(f"{path} is not a readable image ({type(e).__name__}: {e})") from e


def same_tokenizer(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()
