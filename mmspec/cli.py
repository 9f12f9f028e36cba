"""Command line: `python -m mmspec generate --target ... --drafter ... --image ... --prompt ...`.

Prints the answer and a one-line summary, or with --json one object with token_ids (new tokens
only), text and stats; --trace writes the whole step-by-step trace. User errors exit with code 2 and
a one-line message, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from mmspec.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mmspec", description="Lossless speculative decoding for VLMs.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer a prompt about an image, with a drafter")
    g.add_argument("--target", default=None, help="model directory or hub id (default: the embedded model in assets/)")
    g.add_argument("--drafter", default="ngram", help="vanilla, ngram, random, or a draft model directory / hub id")
    g.add_argument("--image", default=None, help="image file (optional for text-only prompts)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tree", default="chain:4", help="chain:K | dynamic:BUDGET,DEPTH,TOPK | static:FILE")
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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _generate(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    from mmspec.drafters import load_drafter
    from mmspec.engine import DecodeConfig, generate
    from mmspec.load import load_image, load_target
    from mmspec.trace import save_trace

    config = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, tree=args.tree,
                          static_cache={"auto": None, "on": True, "off": False}[args.fast_path])
    config.check()
    if not args.prompt.strip():
        raise InputError("the prompt is empty")
    image = load_image(args.image) if args.image else None
    max_memory = None
    if args.max_memory:
        try:
            pairs = (item.split("=", 1) for item in args.max_memory.split(","))
            max_memory = {int(k) if k.strip().isdigit() else k.strip(): v.strip() for k, v in pairs}
        except ValueError as e:
            raise InputError(f"--max-memory wants DEVICE=SIZE[,DEVICE=SIZE...], got {args.max_memory!r}") from e
    target = load_target(args.target, args.device, args.dtype, device_map=args.device_map, max_memory=max_memory,
                         family=args.family)
    drafter = load_drafter(args.drafter, target)
    gen = generate(target, drafter, image, args.prompt, config)
    if args.trace:
        save_trace(gen, args.trace)
    if args.json:
        print(json.dumps({"token_ids": gen.token_ids, "text": gen.text, "stats": asdict(gen.stats), "config": gen.config}))
    else:
        s = gen.stats
        print(gen.text)
        print(f"[{gen.mode} {gen.config['drafter']} {gen.config['tree']}: {s.new_tokens} tokens, {s.steps} steps, "
              f"tau {s.tau:.2f}, {s.tokens_per_s:.1f} tok/s, {s.wall_s:.2f} s]", file=sys.stderr)
    return 0
