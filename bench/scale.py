"""Scale PROJECTION of speculative-decoding speed-up to real 7B vision-language-model sizes.

Real 7B weights cannot reach the lent GPU, but their cost can: random-weight models with the published configs
of LLaVA-1.5-7B and Qwen2.5-VL-7B-Instruct are built straight on the device (init skipped, nothing from a hub),
the parts of a speculative step are timed, and the speed-up is projected from them (never measured end to end):

    projected speed-up = tau * T_target(q=1) / (T_verify(q=B+1) + D * T_draft(q=k) + overhead_ms)

- prefill: the whole VLM (vision tower + projector + LM) on one image's placeholders + 40 random text tokens;
- T_target(q=1), T_verify(q): mmspec's CachedModel.forward of q tokens against the prompt's cache, rolled back
  after each repetition (Qwen2.5-VL's 3-axis M-RoPE positions come from its family adapter). Trees get a
  breadth-first 4-ary tree_attention mask; vanilla steps and chains get mask None, as the engine runs them;
- T_draft(q): an EAGLE-style head (fusion linear 2H->H + one Llama decoder layer of the target's width + the
  target-vocabulary LM head) and an independent 2-layer width-1024 draft LM, each with a prompt-long cache;
- every forward is timed on two paths (--paths): `eager` (DynamicCache, eager forwards) and `graphs` (the
  engine's default on one GPU: preallocated cache, forwards replayed from CUDA graphs, q padded to a power of 2);
- tau: measured elsewhere (bench/embedded_tau.py), per shape: chain:K -> B=K, D=K, k=1; dynamic:B,D,K -> k=K;
- a curve: projected speed-up vs tree budget 1..64 (depth 5, top-k 4, EAGLE head) for tau in {2, 3, 4, 5}.
Unmeasured q are interpolated linearly (extrapolated past the last). --overhead-ms is the engine's own work
per step (tree growth, acceptance, cache bookkeeping); at its default 0 the projection is an upper bound.
Times: CUDA events on GPU, perf_counter on CPU; medians after warm-up, under inference mode.

    python bench/scale.py --device cuda --dtype bfloat16 --out bench/results/scale_projection_h100.json
    python bench/scale.py --tiny --device cpu --out /tmp/scale_tiny.json   # same code path, scaled down
Writes OUT (JSON: raw timings + projections), OUT.md (tables), OUT.fig.json (plotly); OUT's ".json" dropped.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmspec.families import family_for  # noqa: E402
from mmspec.model import CachedModel  # noqa: E402
from mmspec.tree import parse_tree_spec, tree_attention  # noqa: E402

MODELS = ("llava15-7b", "qwen25vl-7b")
TEXT_TOKENS = 40  # text around the image, half before and half after it
TREE_WIDTH = 4  # children per node of the timed trees; attention over q tokens costs the same for any shape
CURVE_DEPTH, CURVE_TOPK, CURVE_TAUS = 5, 4, (2.0, 3.0, 4.0, 5.0)
DEFAULT_TAU = "chain:4=2.52;dynamic:24,5,4=3.95"  # an early CPU measurement (retired FeatNet eagle3); bench/gpu_all.sh passes --tau from its own speed run
LABEL = "projection"
PATHS = ("eager", "graphs")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def vlm_config(name: str, tiny: bool):
    """The published configuration of `name`; `tiny` scales widths, depths and the image down."""
    def n(real, small):
        return small if tiny else real

    if name == "llava15-7b":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
        text = LlamaConfig(vocab_size=32064, hidden_size=n(4096, 64), intermediate_size=n(11008, 172),
                           num_hidden_layers=n(32, 2), num_attention_heads=n(32, 4), num_key_value_heads=n(32, 4),
                           max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                           bos_token_id=1, eos_token_id=2, pad_token_id=32001)
        vision = CLIPVisionConfig(hidden_size=n(1024, 32), intermediate_size=n(4096, 64), num_hidden_layers=n(24, 2),
                                  num_attention_heads=n(16, 2), patch_size=14, image_size=n(336, 56), projection_dim=768,
                                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=n(576, 16),
                           projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default")
    if name == "qwen25vl-7b":
        from transformers import Qwen2_5_VLConfig
        text = dict(vocab_size=152064, hidden_size=n(3584, 64), intermediate_size=n(18944, 128), num_hidden_layers=n(28, 2),
                    num_attention_heads=n(28, 4), num_key_value_heads=n(4, 2), max_position_embeddings=128000,
                    rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False, sliding_window=32768,
                    max_window_layers=n(28, 2), tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
                    # mrope_section shares the head_dim/2 rotary frequencies among (t, h, w): 16+24+24 = 128/2
                    rope_parameters={"rope_type": "default", "mrope_section": n([16, 24, 24], [2, 3, 3]), "rope_theta": 1e6})
        vision = dict(depth=n(32, 2), hidden_size=n(1280, 32), intermediate_size=n(3420, 64), num_heads=n(16, 2),
                      out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      window_size=112, fullatt_block_indexes=n([7, 15, 23, 31], [1]), tokens_per_second=2, hidden_act="silu")
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                                vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)
    raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")


def instantiate(cls, config, device: str, dtype: torch.dtype):
    """`cls(config)` allocated on `device` with init skipped, then filled in place with small finite values
    (a 7B init on the CPU takes minutes; the values do not change the cost). "meta" allocates nothing."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers that keep it in modeling_utils
        from transformers.modeling_utils import no_init_weights
    with no_init_weights(), torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    with torch.no_grad():
        for pname, p in model.named_parameters() if device != "meta" else ():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            else:  # norm gains 1 and biases 0 keep activations finite through 32 random layers
                p.fill_(0.0 if pname.endswith("bias") else 1.0)
    return model.eval()


def build(name: str, tiny: bool, device: str, dtype: torch.dtype = torch.bfloat16):
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
    cls = LlavaForConditionalGeneration if name == "llava15-7b" else Qwen2_5_VLForConditionalGeneration
    return instantiate(cls, vlm_config(name, tiny), device, dtype)


def prompt_inputs(model, tiny: bool) -> dict[str, torch.Tensor]:
    """What a processor would give for one image + TEXT_TOKENS text tokens (random ids and pixels)."""
    cfg, vc, gen = model.config, model.config.vision_config, torch.Generator().manual_seed(0)
    text = [torch.randint(100, 30000, (TEXT_TOKENS // 2,), generator=gen) for _ in range(2)]  # no special ids
    if cfg.model_type == "llava":
        ids = torch.cat([text[0], torch.full(((vc.image_size // vc.patch_size) ** 2,), cfg.image_token_id), text[1]])
        extra = {"pixel_values": torch.randn(1, 3, vc.image_size, vc.image_size, generator=gen)}
    else:  # 672 px = 48x48 patches -> 576 merged tokens, as many as LLaVA's 336 px
        grid = 8 if tiny else 48
        img = torch.full((grid * grid // vc.spatial_merge_size ** 2,), cfg.image_token_id)
        start, end = torch.tensor([cfg.vision_start_token_id]), torch.tensor([cfg.vision_end_token_id])
        ids = torch.cat([text[0], start, img, end, text[1]])
        extra = {"pixel_values": torch.randn(grid * grid, 3 * vc.temporal_patch_size * vc.patch_size ** 2, generator=gen),
                 "image_grid_thw": torch.tensor([[1, grid, grid]])}
        if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:  # newer transformers
            extra["mm_token_type_ids"] = (ids == cfg.image_token_id).int()[None]
    return {"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **extra}


@torch.inference_mode()
def timed(step: Callable[[], object], reset: Callable[[], None] | None, device: torch.device, warm: int, reps: int) -> dict:
    """Median of `reps` timed calls after `warm` untimed ones; `reset` runs untimed after every call."""
    samples = []
    for i in range(warm + reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t = time.perf_counter()
            step()
            ms = (time.perf_counter() - t) * 1000
        if reset is not None:
            reset()
        if i >= warm:
            samples.append(ms)
    return {"median": statistics.median(samples), "samples": samples}


def kary_tree(q: int) -> tuple[list[int], list[int]]:
    """Parents and depths of the q-1 nodes under the root, filled breadth first, TREE_WIDTH children each."""
    parents, depths = [i // TREE_WIDTH - 1 for i in range(q - 1)], []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return parents, depths


def cached(model, path: str, room: int) -> CachedModel:
    """eager: DynamicCache, eager forwards. graphs: the engine's default on one GPU, a preallocated cache whose
    forwards replay CUDA graphs (q padded to a power of two); on the CPU the preallocated cache, eager."""
    family = family_for(model.config)
    return CachedModel(model, family) if path == "eager" else CachedModel(model, family, room=room, graphs=True)


def time_steps(cm: CachedModel, qs: list[int], masks: tuple[str, ...], warm: int, reps: int, before=None) -> dict:
    """CachedModel.forward of q tokens after the committed prompt, rolled back after each call, with a
    TREE_WIDTH-ary `tree` mask and/or `causal` (mask None: how the engine runs vanilla steps and chains)."""
    base, out = cm.committed, {m: {} for m in masks}
    for q in qs:
        parents, depths = kary_tree(q)
        toks = torch.randint(100, 30000, (q,))
        args = {"tree": (torch.tensor([base] + [base + d for d in depths]), tree_attention(parents)),
                "causal": (base + torch.arange(q), None)}
        for m in masks:
            pos, mask = args[m]
            out[m][str(q)] = timed(lambda: (before and before(q), cm.forward(toks, pos, mask)), cm.rollback,
                                   cm.device, warm, reps)
    return out


def time_target(model, tiny: bool, paths: list[str], qs: list[int], room: int, warm: int, reps: int,
                prefill_reps: int) -> dict:
    inputs, out = prompt_inputs(model, tiny), {}
    for path in paths:
        cm = cached(model, path, room)
        prefill = timed(lambda: cm.prefill(inputs), None, cm.device, min(warm, 2), prefill_reps)
        # the last prefill's cache stays: every verify attends to it
        steps = time_steps(cm, qs, ("tree", "causal"), warm, reps)
        out[path] = {"prompt_tokens": cm.committed, "prefill_ms": prefill, **steps}
        # set per kind ("prefill", "decode") when a capture fell back to eager
        st = getattr(cm, "_static", None)
        error = (st.graphs.graph_error if st is not None else None) or None
        out[path].update(cuda_graphs=cm.graphs and not (error or {}).get("decode"), graph_error=error)
        cm.release()
        print(f"[scale]   {path}: prefill {prefill['median']:.1f} ms ({cm.committed} tokens, vision tower included); "
              + ", ".join(f"q={q} {v['median']:.2f}/{out[path]['causal'][q]['median']:.2f}"
                          for q, v in out[path]["tree"].items()) + " ms (tree/causal)", flush=True)
    return out


def time_drafter(kind: str, text_cfg, tiny: bool, base: int, paths: list[str], qs: list[int], room: int,
                 device: torch.device, dtype: torch.dtype, warm: int, reps: int) -> tuple[int, dict]:
    """`eagle_head`: the fusion linear 2H->H on [q, 2H], then a 1-layer LM of the target's width and vocabulary
    fed the q tokens (the fused vector itself is not fed in: same shapes, same cost); `small_draft`: a 2-layer
    width-1024 LM. Both through CachedModel against a prompt-long cache, with the tree mask."""
    from transformers import LlamaConfig, LlamaForCausalLM
    eagle = kind == "eagle_head"
    h = text_cfg.hidden_size if eagle else (32 if tiny else 1024)
    heads = text_cfg.num_attention_heads if eagle else (2 if tiny else 16)
    cfg = LlamaConfig(vocab_size=text_cfg.vocab_size, hidden_size=h, num_hidden_layers=1 if eagle else 2,
                      intermediate_size=text_cfg.intermediate_size if eagle else (64 if tiny else 2816),
                      num_attention_heads=heads, num_key_value_heads=text_cfg.num_key_value_heads if eagle else heads,
                      head_dim=h // heads, max_position_embeddings=8192, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = instantiate(LlamaForCausalLM, cfg, str(device), dtype)
    fc = torch.nn.Linear(2 * h, h, bias=False, device=device, dtype=dtype).requires_grad_(False) if eagle else None
    fused = {q: torch.randn(1, q, 2 * h, device=device, dtype=dtype) for q in qs}  # [token embedding, target feature]
    out = {}
    for path in paths:
        cm = cached(model, path, room)
        cm.prefill({"input_ids": torch.randint(100, 30000, (1, base))})
        out[path] = time_steps(cm, qs, ("tree",), warm, reps, before=(lambda q: fc(fused[q])) if eagle else None)["tree"]
        cm.release()
        print(f"[scale]   {kind} {path}: " + ", ".join(f"q={q} {v['median']:.2f}" for q, v in out[path].items()) + " ms",
              flush=True)
    return sum(p.numel() for p in model.parameters()) + (fc.weight.numel() if eagle else 0), out


def interp(table: dict[str, dict], x: float) -> float:
    """Median time at q=x: linear between measured q's, extrapolated along the last segment."""
    pts = sorted((int(q), v["median"]) for q, v in table.items())
    if len(pts) == 1:
        return pts[0][1]
    i = next((j for j in range(1, len(pts)) if x <= pts[j][0]), len(pts) - 1)
    (q0, t0), (q1, t1) = pts[i - 1], pts[i]
    return t0 + (x - q0) * (t1 - t0) / (q1 - q0)


def parse_tau(text: str) -> list[dict]:
    """`chain:4=3.9;dynamic:24,5,4=4.2` -> shapes with budget B, depth D, tokens per draft forward k, and tau."""
    rows = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        shape, _, tau = part.rpartition("=")
        spec = parse_tree_spec(shape) if shape else None
        if spec is None or spec.kind not in ("chain", "dynamic") or not tau:
            raise SystemExit(f"--tau wants chain:K=TAU or dynamic:B,D,K=TAU, got {part!r}")
        rows.append({"shape": spec.describe(), "kind": spec.kind, "B": spec.max_nodes, "D": spec.depth,
                     "k": 1 if spec.kind == "chain" else spec.topk, "tau": float(tau)})
    return rows


def projected(tau: float, t1: float, t_verify: float, depth: int, t_draft: float, overhead: float) -> float:
    return tau * t1 / (t_verify + depth * t_draft + overhead)


def project(block: dict, shapes: list[dict], overhead: float) -> tuple[list[dict], dict]:
    """Projection rows for every shape x drafter, and speed-up vs tree budget with the EAGLE head (one path)."""
    t1 = block["causal"]["1"]["median"]
    rows = []
    for s in shapes:
        tv = interp(block["causal" if s["kind"] == "chain" else "tree"], s["B"] + 1)  # the engine's mask choice
        for drafter, d in block["drafters"].items():
            td = interp(d, s["k"])
            rows.append({"label": LABEL, **s, "drafter": drafter, "T_target_q1_ms": t1, "T_verify_ms": tv, "T_draft_ms": td,
                         "overhead_ms": overhead, "projected_speedup": projected(s["tau"], t1, tv, s["D"], td, overhead)})
    budgets, eagle = list(range(1, 65)), block["drafters"]["eagle_head"]
    curve = {"label": LABEL, "depth": CURVE_DEPTH, "topk": CURVE_TOPK, "drafter": "eagle_head", "budgets": budgets,
             "speedup": {str(tau): [projected(tau, t1, interp(block["tree"], b + 1), CURVE_DEPTH,
                                              interp(eagle, min(CURVE_TOPK, b)), overhead) for b in budgets]
                         for tau in CURVE_TAUS}}
    return rows, curve


def markdown(res: dict) -> str:
    lines = ["# mmspec scale projection: speculative speed-up at 7B VLM sizes (projected, not measured end to end)", "",
             f"Random-weight models with the published configurations, {res['device_name']}, {res['dtype']}, "
             f"tiny={res['tiny']}. Median ms of {res['reps']} after {res['warmup']} warm-up. Projected speed-up = "
             f"{res['formula']}. Paths: {res['paths_note']}", ""]
    for name, m in res["models"].items():
        for path, b in m["paths"].items():
            qs = sorted({int(q) for d in (b["tree"], *b["drafters"].values()) for q in d})
            lines += [f"## {name}, {path}: measured component times for the projection ({m['params'] / 1e9:.3f}B "
                      f"parameters, prompt {b['prompt_tokens']} tokens, prefill {b['prefill_ms']['median']:.1f} ms, "
                      f"CUDA graphs {b['cuda_graphs']})", "",
                      "| q | target verify, tree mask | target verify, causal | EAGLE head | small draft LM |",
                      "|---|---|---|---|---|"]
            for q in map(str, qs):
                cols = (b["tree"], b["causal"], *b["drafters"].values())
                lines.append(f"| {q} | " + " | ".join(f"{d[q]['median']:.2f}" if q in d else "-" for d in cols) + " |")
            lines += ["", f"### {name}, {path}: projected speed-up (projection; overhead {res['overhead_ms']} ms)", "",
                      "| drafter | shape | B | D | k | tau | T_target(1) | T_verify(B+1) | D x T_draft(k) "
                      "| projected speed-up |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['drafter']} | {r['shape']} | {r['B']} | {r['D']} | {r['k']} | {r['tau']:.2f} | "
                      f"{r['T_target_q1_ms']:.2f} | {r['T_verify_ms']:.2f} | {r['D'] * r['T_draft_ms']:.2f} | "
                      f"{r['projected_speedup']:.2f}x |" for r in b["projections"]] + [""]
    return "\n".join(lines)


def figure(res: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "measured target verify time vs q, tree mask (input to the projection)",
        f"projection: speed-up vs tree budget (depth {CURVE_DEPTH}, top-k {CURVE_TOPK}, EAGLE head)"))
    for name, m in res["models"].items():
        for path, b in m["paths"].items():
            dash = "solid" if path == "graphs" else "dot"
            fig.add_trace(go.Scatter(x=[int(q) for q in b["tree"]], y=[v["median"] for v in b["tree"].values()],
                                     name=f"{name} {path}", line={"dash": dash}), row=1, col=1)
            for tau, ys in b["curve"]["speedup"].items():
                fig.add_trace(go.Scatter(x=b["curve"]["budgets"], y=ys, name=f"{name} {path} tau={tau} (projection)",
                                         line={"dash": dash}), row=1, col=2)
    return fig.update_layout(
        title=f"mmspec scale projection, {res['device_name']} {res['dtype']}: speed-ups projected from component "
              "times, not measured end to end",
        xaxis_title="tokens per target forward q", yaxis_title="ms (median)",
        xaxis2_title="tree budget B (verify q = B+1)", yaxis2_title="projected speed-up (x)")


def write_outputs(res: dict, out: Path) -> None:
    stem = str(out)[: -len(".json")] if out.suffix == ".json" else str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    done = {**res, "models": {k: m for k, m in res["models"].items() if m.get("complete")}}  # tables need every part
    Path(stem + ".md").write_text(markdown(done))
    try:  # plotly is not installed everywhere the benchmark runs (the GPU image lacks it)
        Path(stem + ".fig.json").write_text(figure(done).to_json())
    except ImportError:
        pass


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tiny", action="store_true", help="the same architectures scaled down (CPU tests)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--paths", default="eager,graphs", help="eager and/or graphs (see cached())")
    ap.add_argument("--q", default="1,2,4,8,16,24,32,48,64", help="target tokens per forward to time")
    ap.add_argument("--draft-q", default="1,4,8,10", help="drafter tokens per forward to time")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--prefill-reps", type=int, default=5)
    ap.add_argument("--tau", default=DEFAULT_TAU, help="SHAPE=TAU;... tau measured for each draft shape")
    ap.add_argument("--overhead-ms", type=float, default=0.0, help="engine work per step, added to the denominator")
    ap.add_argument("--out", default="bench/results/scale_projection.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    qs, dqs = (sorted({int(x) for x in s.split(",")} | {1}) for s in (args.q, args.draft_q))  # q=1 is the baseline
    paths = [p for p in PATHS if p in args.paths.split(",")]
    if not paths:
        raise SystemExit(f"--paths wants some of {', '.join(PATHS)}")
    shapes, cuda, out = parse_tau(args.tau), device.type == "cuda", Path(args.out)
    room = 2 * max(qs + dqs) + 8  # the widest forward, padded to a power of two, fits after the prompt
    if cuda:  # as load_target: cuDNN attention makes a new plan for every new key length (ms each)
        torch.backends.cuda.enable_cudnn_sdp(False)
    import transformers
    res = {"label": LABEL, "note": "speed-ups are PROJECTIONS from measured component times of random-weight models "
                                   "with the published configurations; nothing is measured end to end",
           "formula": "tau * T_target(q=1) / (T_verify(q=B+1) + D * T_draft(q=k) + overhead_ms)",
           "paths_note": "eager = DynamicCache, eager forwards; graphs = preallocated cache with CUDA graphs (the "
                         "engine's default on one GPU; q padded to a power of two; eager on the CPU)",
           "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
           "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "transformers": transformers.__version__,
           "tiny": args.tiny, "warmup": args.warmup, "reps": args.reps, "prefill_reps": args.prefill_reps,
           "overhead_ms": args.overhead_ms, "shapes": shapes, "tree_width": TREE_WIDTH, "models": {}}
    for name in filter(None, (m.strip() for m in args.models.split(","))):
        t0 = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        model = build(name, args.tiny, str(device), dtype)
        m = res["models"][name] = {"params": sum(p.numel() for p in model.parameters()), "build_s": time.perf_counter() - t0}
        print(f"[scale] {name}: built {m['params'] / 1e9:.3f}B parameters in {m['build_s']:.1f} s", flush=True)
        m["paths"] = time_target(model, args.tiny, paths, qs, room, args.warmup, args.reps, args.prefill_reps)
        write_outputs(res, out)  # checkpoints: a killed run keeps what it measured
        text_cfg, base = model.config.get_text_config(), m["paths"][paths[0]]["prompt_tokens"]
        if cuda:
            m["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del model  # one 7B model at a time
        _free(cuda)
        m["drafter_params"] = {}
        for kind in ("eagle_head", "small_draft"):
            m["drafter_params"][kind], times = time_drafter(kind, text_cfg, args.tiny, base, paths, dqs, room, device,
                                                            dtype, args.warmup, args.reps)
            for path in paths:
                m["paths"][path].setdefault("drafters", {})[kind] = times[path]
            _free(cuda)
        for path, b in m["paths"].items():
            b["projections"], b["curve"] = project(b, shapes, args.overhead_ms)
            for r in b["projections"]:
                print(f"[scale] {name} {path} {r['drafter']} {r['shape']} tau={r['tau']}: projected speed-up "
                      f"{r['projected_speedup']:.2f}x (projection)", flush=True)
        m["complete"] = True
        write_outputs(res, out)
    print(f"[scale] wrote {args.out} (+ .md, .fig.json)", flush=True)
    return res


if __name__ == "__main__":
    main()
