#!/usr/bin/env bash
# The GPU check in one command, for a short GPU window (see launch/gpu_check.py):
#   bash launch/gpu_check.sh [--budget 540] [--steps env,install,tests,...] [--out DIR]
#   bash launch/gpu_check.sh --probe     # CPython, torch, and what the wheelhouse must bring
#   bash launch/gpu_check.sh --dry       # this CPU, toy sizes: the plumbing only
# Reports go to --out, else $OUT when set, else outputs/gpu_check. A hard limit
# (GPU_CHECK_HARD_LIMIT, default budget + 45 s) kills a hung step; summary.json keeps
# every step that finished.
set -euo pipefail
cd "$(dirname "$0")/.."
# .cache may be a link to another checkout's cache that this machine does not have.
if [ -L .cache ] && [ ! -e .cache ]; then rm .cache; fi
budget=540
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --budget) budget="${args[$((i + 1))]:-540}" ;;
    --budget=*) budget="${args[$i]#--budget=}" ;;
  esac
done
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  # The interpreter that has torch: this checkout's venv here, the image's python on a GPU box.
  for c in .venv/bin/python python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
if [ -z "$PY" ]; then echo "error: no python with torch found (set PYTHON=...)" >&2; exit 2; fi
case "$budget" in ''|*[!0-9.]*) echo "error: --budget must be a number of seconds, got '$budget'" >&2; exit 2 ;; esac
limit=${GPU_CHECK_HARD_LIMIT:-$(( ${budget%.*} + 45 ))}
exec timeout -k 10 "$limit" "$PY" launch/gpu_check.py "$@"
