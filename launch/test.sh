#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (CPU only; multi-rank tests use
# DeepSpeed on gloo). Extra arguments go to pytest, e.g. `bash launch/test.sh -k zero3`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash launch/setup_env.sh | tail -n 1)
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# DeepSpeed JIT-builds its CPU comm op into TORCH_EXTENSIONS_DIR; a per-checkout folder
# keeps two checkouts (two venvs) on one machine from rebuilding it in turn (~1 min each).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
exec "$PYBIN" -m pytest "$@"
