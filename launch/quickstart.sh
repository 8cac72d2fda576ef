#!/usr/bin/env bash
# The main job on a fresh machine: install; convert the bundled SmolLM2-135M-Instruct
# and prepare Rotten Tomatoes (once); fine-tune with GPart under ZeRO-3 on 2 ranks (CPU
# ranks with gloo when there is no GPU); evaluate before and after; export the merged
# model; serve it with `transformers serve` and ask it the held-out reviews. Extra
# arguments are config overrides, e.g. `train.max_steps=100`.
#   bash launch/quickstart.sh [key.sub=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYBIN=$(bash launch/setup_env.sh | tail -n 1)
VENV_BIN=$(dirname "$PYBIN")
NPROC=${NPROC:-2}
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi
out=outputs/smollm2_rt base=.cache/models/SmolLM2-135M-Instruct evals=.cache/data/rotten_tomatoes/eval.jsonl
for arg in "$@"; do
  case "$arg" in
    output_dir=*) out=${arg#output_dir=} ;;
    model.path=*) base=${arg#model.path=} ;;
    data.eval=*) evals=${arg#data.eval=} ;;
  esac
done
# train.resume=auto: a second run continues the first (more train.max_steps) or, at the
# same max_steps, only evaluates and prints its table again; it never replaces it.
# export.overwrite=true: <output_dir>/merged is this run's own export, rewritten from the
# current adapter each time (the same bytes when nothing was trained).
run=(--config configs/smollm2_rt.yaml train.resume=auto export.merged=true export.overwrite=true "$@")
# The checks every rank would make, once and in ~3 s: a bad override is one line and exit 2
# instead of an error per rank inside the launcher's output.
device=cpu; [ "${DS_ACCELERATOR:-}" = cpu ] || device=cuda
"$PYBIN" -m gpart_ds.preflight --nodes 1 --tasks-per-node "$NPROC" --device "$device" "${run[@]}"
"$VENV_BIN/deepspeed" --num_gpus "$NPROC" launch/train.py "${run[@]}"
# The merged folder behind a real server, asked the same held-out reviews at temperature 0,
# its answers compared with the trained model's (base + adapter; full fine-tuning has none).
# Up to 3 of 300 may differ without failing the command: the server decodes each review
# alone, the check in batches, and a near-tie can go either way (1 of 300 for an objective
# whose answers run on; 0 for the default; docs/evaluation.md).
trained=()
[ -d "$out/adapter" ] && trained=(--base "$base" --adapter "$out/adapter")
exec "$PYBIN" -m gpart_ds.serve check --merged "$out/merged" "${trained[@]}" --data "$evals" \
  --max-examples 300 --max-differ 3 --brief
