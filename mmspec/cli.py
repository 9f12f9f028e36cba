"""Command line: `python -m mmspec generate --target ... --drafter ... --image ... --prompt ...`,
and `python -m mmspec export-eagle3 SRC_DIR OUT_DIR` (an mmspec-trained EAGLE-3 head for vLLM / SGLang).

Prints the answer and a one-line summary, or with --json one object with token_ids (new tokens
only), text and stats; --trace writes the whole step-by-step trace. User errors (argument syntax
included) exit with code 2 and exactly one line on stderr, `error: ...`, never a traceback; every
cheap check runs before a model is loaded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from mmspec.errors import InputError

MAX_MESSAGE = 600  # characters of an error line; messages may quote the user's (long) input


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one `error:` line (its default prints the usage too)."""

    def error(self, message: str):
        _say_error(f"{self.prog}: {message}")
        sys.exit(2)


def _say_error(message: str) -> None:
    line = " ".join(str(message).split())  # one line whatever the message holds
    if len(line) > MAX_MESSAGE:
        line = line[: MAX_MESSAGE - 3] + "..."
    print(f"error: {line}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from mmspec.drafters import registry

    ap = _Parser(prog="python -m mmspec", description="Lossless speculative decoding for VLMs.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="answer a prompt about an image, with a drafter")
    g.add_argument("--target", default=None, help="model directory or hub id (default: the embedded model in assets/)")
    g.add_argument("--drafter", default=None, help=registry.help_text() + " "
                   "(default: for the embedded target the fastest method measured on a GPU, "
                   "assets/default_method.json; else ngram)")
    g.add_argument("--image", default=None, help="image file (optional for text-only prompts)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tree", default=None, help="chain:K | dynamic:BUDGET,DEPTH,TOPK | static:FILE "
                   "(default: the measured default's shape with the default drafter, else chain:4)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on cuda, fp32 on cpu)")
    g.add_argument("--device-map", default=None, help="split the target with accelerate, e.g. auto")
    g.add_argument("--max-memory", default=None, help="with --device-map: per-device limits, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    g.add_argument("--fast-path", choices=["auto", "on", "off"], default="auto",
                   help="preallocated KV cache + CUDA graphs: auto = on for a target on one GPU; "
                        "on = also on the CPU (cache only); off = eager forwards, growing cache")
    g.add_argument("--family", default=None, help="force a family adapter: llava, qwen2_vl, smolvlm, gemma3, paligemma")
    g.add_argument("--trace", default=None, help="write the full trace JSON here")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    e = sub.add_parser("export-eagle3", help="write an EAGLE-3 head trained by mmspec as a vLLM / SGLang head directory")
    e.add_argument("src", metavar="SRC_DIR")
    e.add_argument("out", metavar="OUT_DIR")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _quiet_libraries():
            return _export_eagle3(args) if args.command == "export-eagle3" else _generate(args)
    except InputError as e:
        _say_error(e)
        return 2


def _with_defaults(args) -> None:
    """No --drafter: with the embedded target, the fastest method measured for it on a GPU (and its
    shape, unless --tree is given); with another target, the n-gram drafter (it needs no model)."""
    from mmspec.defaults import FALLBACK, default_method

    if args.drafter is None:
        best = default_method() if args.target is None else None
        args.drafter, tree = (best.drafter, best.tree) if best else FALLBACK
        args.tree = args.tree or tree
    args.tree = args.tree or "chain:4"


@contextlib.contextmanager
def _quiet_libraries():
    """Keep library chatter (progress bars, warnings, hub retry notices) off stderr, whose contract
    is one summary line or one error line; `python -W ...` still shows warnings when asked for."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    loggers = [logging.getLogger(name) for name in ("transformers", "huggingface_hub", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not sys.warnoptions:
                warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _generate(args) -> int:
    _with_defaults(args)
    from mmspec.drafters import registry
    from mmspec.engine import DecodeConfig, generate
    from mmspec.load import load_image, load_target, resolve_device, resolve_dtype
    from mmspec.trace import save_trace

    config = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, tree=args.tree,
                          static_cache={"auto": None, "on": True, "off": False}[args.fast_path])
    config.check()
    if not args.prompt.strip():
        raise InputError("the prompt is empty")
    # Everything cheap is checked before a model loads: a typo costs no loading time.
    resolve_dtype(args.dtype, resolve_device(args.device))
    image = load_image(args.image) if args.image is not None else None
    max_memory = _max_memory(args.max_memory, args.device_map)
    if args.trace:
        _check_writable(args.trace)
    registry.find(args.drafter)  # an unknown drafter name, or a path that cannot be a drafter
    target = load_target(args.target, args.device, args.dtype, device_map=args.device_map, max_memory=max_memory,
                         family=args.family)
    _check_placeholders(args.prompt, target)
    drafter = registry.load_drafter(args.drafter, target)
    gen = generate(target, drafter, image, args.prompt, config)
    if args.trace:
        try:
            save_trace(gen, args.trace)
        except OSError as e:  # the disk filled or the file was taken away while decoding
            raise InputError(f"cannot write the trace to {args.trace}: {e.strerror or e}") from e
    if args.json:
        print(json.dumps({"token_ids": gen.token_ids, "text": gen.text, "stats": asdict(gen.stats), "config": gen.config}))
    else:
        s = gen.stats
        print(gen.text)
        print(f"[{gen.mode} {gen.config['drafter']} {gen.config['tree']}: {s.new_tokens} tokens, {s.steps} steps, "
              f"tau {s.tau:.2f}, {s.tokens_per_s:.1f} tok/s, {s.wall_s:.2f} s]", file=sys.stderr)
    return 0


def _export_eagle3(args) -> int:
    from mmspec.drafters.eagle3_head import export_eagle3

    print(export_eagle3(args.src, args.out))
    return 0


def _check_placeholders(prompt: str, target) -> None:
    """The processor expands its image placeholder once per image: typed into the prompt, it makes
    the counts disagree and the processor fail with a ValueError."""
    for attr in ("image_token", "video_token"):
        token = getattr(target.processor, attr, None)
        if isinstance(token, str) and token and token in prompt:
            raise InputError(f"the prompt contains {token!r}, the target's {attr.replace('_', ' ')} placeholder; "
                             "the image goes in --image")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B|B)?", re.IGNORECASE)


def _max_memory(text: str | None, device_map: str | None) -> dict | None:
    """--max-memory 0=70GiB,cpu=200GiB as accelerate's dict; sizes and devices checked here."""
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise InputError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    if text is None:
        return None
    if device_map is None:
        raise InputError("--max-memory only applies with --device-map (e.g. --device-map auto)")
    limits: dict = {}
    for item in text.split(","):
        key, sep, size = (part.strip() for part in item.partition("="))
        if not sep or not (key.isdigit() or key in ("cpu", "disk", "mps")) or not _SIZE.fullmatch(size):
            raise InputError(f"--max-memory wants DEVICE=SIZE[,DEVICE=SIZE...] with DEVICE a GPU index, cpu or disk "
                             f"and SIZE like 70GiB, got {text!r}")
        limits[int(key) if key.isdigit() else key] = size
    return limits


def _check_writable(name: str) -> None:
    """Refuse a --trace path that could not be written, before minutes of decoding are spent. Opening
    it is the only reliable test (permission bits say nothing for root, on /proc or a read-only mount)."""
    path = Path(name)
    try:
        if path.is_dir():
            raise InputError(f"--trace {name} is a directory; give a file name such as {path / 'trace.json'}")
        if not path.parent.is_dir():
            raise InputError(f"--trace {name}: directory {path.parent} does not exist")
        existed = path.exists()
        if existed and not path.is_file():  # a FIFO or device: opening it could block or write nowhere
            raise InputError(f"--trace {name} exists and is not a regular file")
        with path.open("a"):  # append: an existing file is not truncated by the check
            pass
        if not existed:
            path.unlink()
    except OSError as e:
        raise InputError(f"--trace {name} cannot be written: {e.strerror or e}") from e
