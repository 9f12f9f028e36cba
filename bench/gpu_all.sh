#!/usr/bin/env bash
# Every GPU number of the project in one command (one lent-GPU call of < 10 minutes):
#   TRAIN_FEAT_MIN=4 bash bench/gpu_all.sh OUTDIR
# 1. the CUDA losslessness tests (static cache + CUDA graphs), the bf16 divergence check and the
#    target's accuracy check (world_eval, 200 images), side by side for CHECKS_S seconds (default
#    150; 0 skips them); with TRAIN_FEAT_MIN>0 every feature drafter is retrained meanwhile;
# 2. then, alone on the GPU so timings are clean: the speed benchmark (T=0 and T=1, every method;
#    SPEED_ARGS, SPEED_S) and the 7B scale projection (SCALE=0 skips it).
# Logs, results.tar (JSON, markdown, figures) and tarred drafters land in OUTDIR (few files: the
# device tool returns at most 8).
set -uo pipefail
OUT_DIR=${1:?usage: bench/gpu_all.sh OUTDIR}
mkdir -p "$OUT_DIR" .out/feat
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT_DIR/phase1.log
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } >"$LOG" 2>&1

R=.out/results; rm -rf $R; mkdir -p $R
budget_s=${CHECKS_S:-150}
if [ "${TRAIN_FEAT_MIN:-0}" != 0 ]; then
  budget_s=$(python3 -c "print(int(float('$TRAIN_FEAT_MIN') * 60))")
  ( python3 -m mmspec.train_feature --variant all --out .out/feat --device cuda --steps 20000 --batch 64 \
      --workers 8 --engine-eval 0 --time-budget-min "$TRAIN_FEAT_MIN" >"$OUT_DIR/train_feature.log" 2>&1
    cp -r .out/feat/mmspec-feat-* assets/models/   # the benchmark below uses the new drafters
    tar cf - -C .out/feat $(cd .out/feat && ls -d mmspec-feat-*) | split -b 15M - "$OUT_DIR/feat.tar." ) &
fi
if [ "$budget_s" != 0 ]; then
  ( MMSPEC_TEST_DEVICE=cuda timeout $budget_s nice python3 -m pytest -q -rf -p no:cacheprovider \
      tests/test_lossless.py tests/test_sampling.py -k "static_cache or padded or speculative_equals or stacked or fast_path" \
      >$R/cuda_tests.log 2>&1 ) &
  ( timeout $budget_s nice python3 bench/divergence.py --target assets/models/mmspec-target \
      --drafter assets/models/mmspec-draft-vlm --device cuda --dtype bfloat16 --n 20 --max-new-tokens 128 \
      --out $R/divergence_bf16.json >$R/divergence.log 2>&1 ) &
  timeout $budget_s nice python3 -m mmspec.world_eval --target assets/models/mmspec-target --n 200 \
    --device cuda --json-out $R/world_eval.json >$R/world_eval.log 2>&1
  wait
fi

echo "--- speed benchmark" >>"$LOG"
speed_s=${SPEED_S:-185}
timeout $((speed_s + 30)) python3 bench/speed.py --device cuda --dtype bfloat16 ${SPEED_ARGS:-} \
  --time-budget-s $speed_s --out $R/speed_gpu.json >>"$LOG" 2>&1
tar cf "$OUT_DIR/results.tar" -C $R .  # again below; this one survives a cut during the projection
if [ "${SCALE:-1}" != 0 ]; then
echo "--- scale projection" >>"$LOG"
# tau of the best feature drafter per shape at T=0 in the run above (the draft VLM's if none loaded)
TAU=$(python3 - "$R/speed_gpu.json" <<'PY' 2>>"$LOG"
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r.get("temperature") == 0 and not r.get("error") and r.get("tau")]
out = []
for shape in ("chain:4", "dynamic:24,5,4"):
    cand = [r for r in rows if r["method"].endswith(":" + shape) and "feat" in r["method"]] or \
           [r for r in rows if r["method"].endswith(":" + shape) and "draft-vlm" in r["method"]]
    if cand:
        best = max(cand, key=lambda r: r["tau"])
        print(f"projection tau {shape} from {best['method']}: {best['tau']:.2f}", file=sys.stderr)
        out.append(f"{shape}={best['tau']:.3f}")
print(";".join(out))
PY
)
timeout 90 python3 bench/scale.py --device cuda --dtype bfloat16 ${TAU:+--tau "$TAU"} ${SCALE_ARGS:-} \
  --out $R/scale_gpu.json >>"$LOG" 2>&1
fi
tar cf "$OUT_DIR/results.tar" -C $R .
ls -la "$OUT_DIR" >>"$LOG"
