#!/usr/bin/env bash
# Does the ranking predict? The `ranking` section of bench/strategies_bench.py on a GPU machine,
# where fully retraining eight finalists takes minutes instead of the ~2 hours of a 2-core CPU.
#
# 1. `caitsearch search --budget 0.6` with the bench's recipe, 8 finalists, training on cuda and the
#    committed CPU latency profile (candidates are timed on this machine's CPU, 2 threads), stopped
#    after the ranking (--retrain-top 0): ranking.parquet holds each finalist's proxy KL and its
#    validation accuracy after every short fine-tune rung.
# 2. Every finalist retrained in full by `caitsearch train --config` (the same recipe and splits
#    as the search's final retraining), all eight at once on the one GPU: final.json.
# 3. On the CPU machine: `python bench/strategies_bench.py --only ranking --ranking-from DIR`
#    computes the Spearman figures into bench/results/strategies.json and BENCHMARKS.md.
#
#   OUT=/tmp/ranking bash bench/ranking_gpu.sh      # python with torch, timm, optuna, typer, pandas
#
# Measured 2026-12-04 on an H200 (bench/results/gpu/ranking-b0.6/): step 1 with --retrain-top 8
# instead, stopped by the device-time limit during the search's sequential retrainings (~37 s each)
# and its ranking kept; steps 2 then ran as written here, the eight retrainings in 106 s.
set -euo pipefail
: "${OUT:?set OUT to a writable directory}"
PY=${PYTHON:-python}
BUDGET=${BUDGET:-0.6}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cait() { "$PY" -m caitsearch "$@"; }
run="$OUT/ranking-b$BUDGET"
mkdir -p "$run" /tmp/ranking-retrain
{ nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep "Model name"; nproc; } > "$run/machine.txt"

cait search --budget "$BUDGET" --epochs 3 --minutes 0 --repeats 10 --finalists 8 --retrain-top 0 --device cuda \
  --profile hw_profiles/deit_fmnist_patch4_32_32x32_torch-cpu_b32_fp32 --allow-foreign-profile \
  --out /tmp/ranking-search --no-progress --json > /dev/null
cp /tmp/ranking-search/{manifest.json,ranking.parquet,remeasured.json} "$run/"

"$PY" - "$run" <<'EOF'
import json, sys
from pathlib import Path
import pandas as pd
from caitsearch import CompressionConfig
run = Path(sys.argv[1])
configs = {c["trial"]: c["config"] for c in json.loads((run / "remeasured.json").read_text())["candidates"]}
for trial in pd.read_parquet(run / "ranking.parquet")["trial"]:
    CompressionConfig.from_dict(configs[int(trial)]).save(Path("/tmp/ranking-retrain") / f"trial-{int(trial)}.json")
EOF

for config in /tmp/ranking-retrain/trial-*.json; do
  t=$(basename "$config" .json)
  cait train --config "$config" --epochs 3 --device cuda --threads 2 --out "/tmp/ranking-retrain/$t" --json \
    > "/tmp/ranking-retrain/$t.out" &
done
wait
"$PY" - "$run" <<'EOF'
import json, sys
from pathlib import Path
finals = {p.stem: json.loads(p.read_text()) for p in sorted(Path("/tmp/ranking-retrain").glob("trial-*.out"))}
(Path(sys.argv[1]) / "final.json").write_text(json.dumps(finals, indent=1) + "\n")
EOF
echo "ranking and final retrainings in $run" >&2
