#!/usr/bin/env bash
# Quick CUDA latency profiles (fp16 and fp32, batch 32) of a DeiT, each validated end to end on
# random configs, plus the GPU tests. Run from the repo root with a python that has torch, timm,
# pandas, typer, rich, matplotlib, optuna and nvidia-ml-py; everything is written under $OUT.
#
#   OUT=/tmp/gpu_check bash bench/gpu_profile_check.sh
#   MODEL=deit_tiny_patch16_224 CONFIGS=30 FULL=1 OUT=... bash bench/gpu_profile_check.sh
set -euo pipefail
: "${OUT:?set OUT to a writable directory}"
PY=${PYTHON:-python}
MODEL=${MODEL:-deit_small_patch16_224}
CONFIGS=${CONFIGS:-20}
QUICK=$([ "${FULL:-0}" = 1 ] && echo "" || echo "--quick")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cait() { "$PY" -c "from caitsearch.cli import main; main()" "$@"; }

mkdir -p "$OUT"
nvidia-smi --query-gpu=name,uuid,driver_version,clocks.max.sm,power.limit --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
for dtype in fp16 fp32; do
  dir="$OUT/${MODEL}_cuda_b32_${dtype}"
  echo "== profile $MODEL cuda $dtype ($QUICK)" >&2
  start=$(date +%s)
  cait profile --model "$MODEL" --backend cuda --dtype "$dtype" --batch-size 32 $QUICK --out "$dir" --json > "$dir.profile.json"
  echo "$(( $(date +%s) - start ))" > "$dir.profile_seconds"
  echo "== validate $MODEL cuda $dtype on $CONFIGS configs" >&2
  cait profile validate "$dir" --configs "$CONFIGS" --json > "$dir.validation.json"
done

"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'profile':45s} {'secs':>5s} {'dense ms':>9s} {'MAPE%':>6s} {'±5%':>5s} {'±10%':>5s} {'rho':>6s} {'throttled':>9s}")
for v in sorted(out.glob("*.validation.json")):
    name = v.name[: -len(".validation.json")]
    r = json.loads(v.read_text())
    p = json.loads((out / f"{name}.profile.json").read_text())
    secs = (out / f"{name}.profile_seconds").read_text().strip()
    import pandas as pd
    t = pd.read_parquet(out / name / "table.parquet")
    print(f"{name:45s} {secs:>5s} {p['dense_ms']:9.3f} {r['mape_pct']:6.1f} {r['within_5pct']:5.0%} "
          f"{r['within_10pct']:5.0%} {r['spearman']:6.3f} {int(t['throttled'].sum()):>9d}")
PYEOF

if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest -q tests/test_profile.py -k "cuda or tensorrt" 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -3
fi
