#!/usr/bin/env bash
# The GPU check on a machine with a GPU and torch but maybe no hydra-core/omegaconf: wheels put
# in .whl/ (see the device notes) are installed to /tmp/site first. No Ray is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
torchrun --nproc_per_node=1 scripts/gpu_check.py "$@"
