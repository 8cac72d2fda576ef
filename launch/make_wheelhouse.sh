#!/usr/bin/env bash
# Wheels for the GPU machine (CUDA torch, no network): what gpart_ds needs besides torch,
# at the versions of launch/lock/cuda.txt, cut into .gpu_carry/partN/ (<= 56 MiB each, for a
# machine that takes files in copies of at most 64 MiB). See launch/wheelhouse.py and launch/gpu_check.sh.
#   bash launch/make_wheelhouse.sh [--python 3.12] [--only deepspeed,omegaconf] [--smollm2]
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash launch/setup_env.sh | tail -n 1)
exec "$PYBIN" launch/wheelhouse.py build "$@"
