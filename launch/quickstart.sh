#!/usr/bin/env bash
# The main job on a fresh machine: install; convert the bundled SmolLM2-135M-Instruct
# and prepare Rotten Tomatoes (once); fine-tune with GPart under ZeRO-3 on 2 ranks (CPU
# ranks with gloo when there is no GPU); evaluate before and after; print a table.
# Extra arguments are config overrides, e.g. `train.max_steps=100`.
#   bash launch/quickstart.sh [key.sub=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash launch/setup_env.sh | tail -n 1)
VENV_BIN=$(dirname "$PYBIN")
NPROC=${NPROC:-2}
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi
# train.resume=auto: a second run continues the first (more train.max_steps) or, at the
# same max_steps, only evaluates and prints its table again; it never replaces it.
exec "$VENV_BIN/deepspeed" --num_gpus "$NPROC" launch/train.py --config configs/smollm2_rt.yaml \
  train.resume=auto "$@"
