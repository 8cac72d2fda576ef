#!/usr/bin/env bash
# The main job on a fresh machine: install, then train GPart under ZeRO-3 on 2 ranks
# (CPU ranks with gloo when there is no GPU). Extra arguments are config overrides.
#   bash launch/quickstart.sh [key.sub=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash launch/setup_env.sh | tail -n 1)
VENV_BIN=$(dirname "$PYBIN")
NPROC=${NPROC:-2}
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi
exec "$VENV_BIN/deepspeed" --num_gpus "$NPROC" launch/train.py --config configs/tiny.yaml "$@"
