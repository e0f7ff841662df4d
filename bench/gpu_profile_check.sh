#!/usr/bin/env bash
# CUDA latency profiles of a DeiT (batch 32, CUDA graphs by default), each validated end to end on
# random configs, each strategy's uniform schedule at budget 0.5 timed against dense in the
# profile's own runtime (`caitsearch bench --profile`), then the GPU tests. Run from the repo root
# with a python that has torch, timm, pandas, typer, rich, matplotlib, optuna and nvidia-ml-py;
# everything is written under $OUT.
#
#   OUT=/tmp/gpu_check bash bench/gpu_profile_check.sh
#   MODEL=deit_tiny_patch16_224 DTYPES="fp16 fp32" BATCHES="32 256" GRAPHS=0 FULL=1 OUT=... bash bench/gpu_profile_check.sh
set -euo pipefail
: "${OUT:?set OUT to a writable directory}"
PY=${PYTHON:-python}
MODEL=${MODEL:-deit_small_patch16_224}
CONFIGS=${CONFIGS:-20}
DTYPES=${DTYPES:-fp16}
BATCHES=${BATCHES:-32}
QUICK=$([ "${FULL:-0}" = 1 ] && echo "" || echo "--quick")
GRAPHS=$([ "${GRAPHS:-1}" = 1 ] && echo "--cuda-graphs" || echo "")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cait() { "$PY" -c "from caitsearch.cli import main; main()" "$@"; }

mkdir -p "$OUT"
nvidia-smi --query-gpu=name,uuid,driver_version,clocks.max.sm,power.limit --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
for dtype in $DTYPES; do
  for batch in $BATCHES; do
    dir="$OUT/${MODEL}_cuda_b${batch}_${dtype}$([ -n "$GRAPHS" ] && echo _graphs)"
    echo "== profile $MODEL cuda $dtype batch $batch $QUICK $GRAPHS" >&2
    start=$(date +%s)
    cait profile --model "$MODEL" --backend cuda --dtype "$dtype" --batch-size "$batch" $QUICK $GRAPHS --out "$dir" --json > "$dir.profile.json"
    echo "$(( $(date +%s) - start ))" > "$dir.profile_seconds"
    echo "== validate on $CONFIGS configs per family" >&2
    cait profile validate "$dir" --strategy all --configs "$CONFIGS" --json > "$dir.validation.json"
    for strategy in cait atme cdcp tome; do
      echo "== bench $strategy at budget 0.5" >&2
      cait bench --model "$MODEL" --strategy "$strategy" --budget 0.5 --profile "$dir" --json > "$dir.bench-$strategy-0.5.json" || true
    done
  done
done

if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_profile.py tests/test_runtime.py -k "cuda or tensorrt or gpu" 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -3
fi
