#!/usr/bin/env bash
# Every GPU check of the project in one run, for a GPU machine lent for a few minutes. Writes
# its logs under $OUT (default gpu_out/):
#   1. pytest -m gpu         NCCL loop, every precision, compile, NVML, auto micro-batch, Ray on GPU
#   2. scripts/bench_gpu.py  plain DDP vs dist-trainer (fp32/bf16, batch 256/8192), DataLoader
#   3. dist-trainer train scaling.use_gpu=true through Ray, and what it logged
# A machine without Ray/MLflow/Hydra: put an offline kit that installs them into .carry/ (git-
# ignored) with an install.sh that unpacks into /tmp/raysite; it is used when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -f .carry/gpu-carry/install.sh ]; then
  bash .carry/gpu-carry/install.sh || exit 1
  export PYTHONPATH=/tmp/raysite:${PYTHONPATH:-} MLFLOW_DISABLE_TELEMETRY=true
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -m gpu -p no:cacheprovider -v -rs 2>&1 | tee "$OUT/pytest_gpu.log"
else
  echo "no pytest here: carry its wheel (pytest, pluggy, iniconfig) to run step 1" | tee "$OUT/pytest_gpu.log"
fi
python3 scripts/bench_gpu.py --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
python3 -m dist_trainer.cli train experiment=bench_mlp scaling.use_gpu=true scaling.num_workers=1 \
  trainer.max_epochs=3 "tracking.uri=sqlite:///$PWD/$OUT/mlflow.db" "scaling.storage_path=$PWD/$OUT/ray" \
  2>&1 | tee "$OUT/ray_gpu_train.log"
python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/ray_gpu_metrics.txt"
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(f"sqlite:///{sys.argv[1]}/mlflow.db")
for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
    print(run.info.run_name, run.info.status)
    for key, value in sorted(run.data.metrics.items()):
        print(f"  {key} = {value:.6g}")
PY
