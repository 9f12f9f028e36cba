#!/usr/bin/env bash
# Every GPU number of the project in one command (one lent-GPU call of < 10 minutes):
#   TRAIN_MIN=4.8 bash bench/gpu_all.sh OUTDIR
# 1. with TRAIN_MIN > 0: the feature drafters (one trainer process per set of TRAIN_SETS, each
#    "variants:pool[:unroll]", default the three most distinct FeatNet variants and the other seven,
#    4096 prompts each; SAMPLED_FRAC of the answers sampled, UNROLL training-time-test steps where a
#    set names none, FEAT_ARGS passed on, e.g. "--init assets/models --lr 1e-3" to continue the
#    shipped drafters) and the EAGLE-3 format head mmspec-feat-eagle3 (HEAD_ARGS; TRAIN_HEAD=0: not)
#    retrained by self-distillation,
#    side by side, while the CUDA losslessness tests run (fp32, CHECKS_S seconds, 0 skips them);
#    the new drafters replace those in assets/models for what follows;
# 2. then, alone on the GPU so timings are clean: the speed benchmark on describe prompts (T=0 and
#    T=1, SPEED_ARGS, SPEED_S) which records the fastest method as the default
#    (assets/default_method.json), the same on mixed short-answer prompts (MIX_ARGS, T=0), and the
#    7B scale projection with the measured tau (SCALE=0 skips it), and with DIV_DRAFTERS (comma-
#    separated) bench/divergence.py's bf16 margins for each (DIV_N prompts).
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
M=assets/models
TRAIN_MIN=${TRAIN_MIN:-0}
if [ "$TRAIN_MIN" != 0 ]; then
  lim=$(python3 -c "print(int(float('$TRAIN_MIN') * 60 + 60))")
  # Half the answers sampled at T=1: drafters trained on greedy answers alone lose most of their
  # acceptance on sampled prefixes (bench/results: T=1 tau fell to half of T=0's).
  frac=${SAMPLED_FRAC:-0.5}
  feat="--device cuda --out .out/feat --batch 128 --sampled-frac $frac --time-budget-min $TRAIN_MIN ${FEAT_ARGS:-}"
  i=0
  for set in ${TRAIN_SETS:-dream,vispec,aasd:4096 eagle,pool2,pool4,topk,msd,flash,dream_topk:4096}; do
    i=$((i + 1))  # one trainer per set (variants:pool[:unroll]), side by side
    IFS=: read -r variants pool unroll <<<"$set"
    unroll=${unroll:-${UNROLL:-}}
    ( timeout $lim python3 -m mmspec.train_feature --variant $variants --pool $pool $feat ${unroll:+--unroll $unroll} \
        >$R/train_feat$i.log 2>&1 ) &
  done
  if [ "${TRAIN_HEAD:-1}" != 0 ]; then
    ( timeout $lim python3 -m mmspec.train_eagle3 --out .out/feat/mmspec-feat-eagle3 --device cuda --sampled-frac $frac \
        --time-budget-min $TRAIN_MIN ${HEAD_ARGS:-} >$R/train_eagle3.log 2>&1 ) &
  fi
fi
if [ "${CHECKS_S:-150}" != 0 ]; then
  MMSPEC_TEST_DEVICE=cuda timeout ${CHECKS_S:-150} nice python3 -m pytest -q -rf -p no:cacheprovider -m "not slow" \
    tests/test_lossless.py tests/test_sampling.py tests/test_feature_drafter.py tests/test_eagle3_head.py \
    -k "static_cache or padded or speculative_equals or stacked or fast_path or device or eagle3 or head" \
    >$R/cuda_tests.log 2>&1
fi
wait
if [ "$TRAIN_MIN" != 0 ] && ls -d .out/feat/mmspec-* >/dev/null 2>&1; then
  cp -r .out/feat/mmspec-* $M/   # the benchmark below uses the new drafters
  tar cf - -C .out/feat $(cd .out/feat && ls -d mmspec-*) | split -b 15M - "$OUT_DIR/drafters.tar."
fi

echo "--- speed benchmark" >>"$LOG"
speed_s=${SPEED_S:-185}
timeout $((speed_s + 30)) python3 bench/speed.py --device cuda --dtype bfloat16 ${SPEED_ARGS:-} \
  --time-budget-s $speed_s --write-default $R/default_method.json --out $R/speed_gpu.json >>"$LOG" 2>&1
if [ -n "${MIX_ARGS:-}" ]; then
  echo "--- mixed prompts" >>"$LOG"
  timeout ${MIX_S:-90} python3 bench/speed.py --device cuda --dtype bfloat16 --kind mix --n 12 --temperatures 0 \
    $MIX_ARGS --out $R/speed_gpu_mix.json >>"$LOG" 2>&1
fi
tar cf "$OUT_DIR/results.tar" -C $R .  # again below; this one survives a cut during the projection
if [ "${SCALE:-1}" != 0 ]; then
echo "--- scale projection" >>"$LOG"
# tau of the best feature drafter per shape at T=0 in the run above (the draft VLM's if none loaded)
TAU=$(python3 - "$R/speed_gpu.json" <<'PY' 2>>"$LOG"
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r.get("temperature") == 0 and not r.get("error") and r.get("tau")]
out = []
for shape in ("chain:4", "chain:8", "dynamic:24,5,4"):
    cand = [r for r in rows if r["method"].endswith(":" + shape) and "feat" in r["method"]] or \
           [r for r in rows if r["method"].endswith(":" + shape) and "draft-vlm" in r["method"]]
    if cand:
        best = max(cand, key=lambda r: r["tau"])
        print(f"projection tau {shape} from {best['method']}: {best['tau']:.2f}", file=sys.stderr)
        out.append(f"{shape}={best['tau']:.3f}")
print(";".join(out))
PY
)
timeout ${SCALE_S:-90} python3 bench/scale.py --device cuda --dtype bfloat16 ${TAU:+--tau "$TAU"} ${SCALE_ARGS:-} \
  --out $R/scale_gpu.json >>"$LOG" 2>&1
fi
tar cf "$OUT_DIR/results.tar" -C $R .
for d in $(echo "${DIV_DRAFTERS:-}" | tr , " "); do
  echo "--- divergence $d" >>"$LOG"
  timeout ${DIV_S:-60} python3 bench/divergence.py --target $M/mmspec-target --drafter $M/$d --device cuda \
    --dtype bfloat16 --n ${DIV_N:-12} --trees "chain:12,dynamic:24,5,4" --out $R/divergence_$d.json >>"$LOG" 2>&1
  tar cf "$OUT_DIR/results.tar" -C $R .
done
ls -la "$OUT_DIR" >>"$LOG"
