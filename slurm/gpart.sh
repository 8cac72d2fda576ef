#!/usr/bin/env bash
# GPart fine-tuning on a SLURM cluster: N nodes x G GPUs, one task (rank) per GPU.
#
#   sbatch --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 slurm/gpart.sh configs/llama70b.yaml [key=value ...]
#   GPART_CONFIG=configs/llama70b.yaml sbatch --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 slurm/gpart.sh
#
# Submit from the repository root on a file system every node mounts (or set GPART_ROOT).
# Variables (all optional):
#   GPART_CONFIG          the run YAML, when it is not the first argument
#   GPART_ROOT            repository root; default: the submit directory
#   GPART_PYTHON          default: $GPART_ROOT/.venv/bin/python if present, else python3
#   GPART_DEVICE          cuda (default) or cpu (gloo ranks: tests the script without GPUs)
#   GPART_LOG_DIR         default $GPART_ROOT/logs/slurm; this job logs to <that>/<job name>-<job id>/
#   GPART_PG_TIMEOUT_MIN  process-group timeout in minutes, default 120 (dist.timeout_minutes)
#   MASTER_PORT           default: 10000 + job id mod 20000 (the same for every rank and restart)
#
# Launch choice: srun starts every rank itself (no DeepSpeed hostfile / pdsh runner). No
# ssh between nodes is needed; SLURM tracks, cgroups and accounts every process, delivers
# --signal to each rank directly (the ranks checkpoint on it), and cleans up the whole step.
# Each task's RANK / WORLD_SIZE / LOCAL_RANK come from SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID; MASTER_ADDR is the first host of the allocation.
#
# Preemption and time limits: 120 s before the time limit SLURM sends SIGUSR1 to every rank
# (--signal); the ranks finish their step, agree, write a checkpoint and exit 75. This
# script then requeues the job, and the requeued run resumes from that checkpoint
# (train.resume=auto is always passed). A preemption by SLURM itself sends SIGTERM, which
# the ranks treat the same way.
#
# Options here are defaults: sbatch's command line overrides them. Comments must not share
# a line with an #SBATCH option.
#SBATCH --job-name=gpart
#SBATCH --nodes=1
# One task per GPU: keep --ntasks-per-node equal to --gpus-per-node.
#SBATCH --ntasks-per-node=8
#SBATCH --time=24:00:00
# USR1 to every rank 120 s before the limit: more than one step plus a checkpoint.
#SBATCH --signal=USR1@120
#SBATCH --requeue
# A requeued run appends to the same log files instead of truncating them.
#SBATCH --open-mode=append
set -euo pipefail

ROOT=${GPART_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ROOT"
: "${SLURM_JOB_ID:?run this script with sbatch}"
CONFIG=${GPART_CONFIG:-}
if [ -z "$CONFIG" ] && [ $# -gt 0 ] && [[ "$1" != *=* ]]; then CONFIG=$1; shift; fi
if [ -z "$CONFIG" ]; then
  echo "gpart.sh: no config: pass it as the first argument or set GPART_CONFIG" >&2; exit 2
fi
if [ ! -f launch/train.py ]; then
  echo "gpart.sh: $ROOT is not the gpart_ds repository: submit from its root or set GPART_ROOT" >&2; exit 2
fi
PY=${GPART_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
DEVICE=${GPART_DEVICE:-cuda}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NTASKS=${SLURM_NTASKS:?submit with --ntasks-per-node (one task per GPU)}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$(( NTASKS / NNODES ))}
if [ $(( TASKS_PER_NODE * NNODES )) -ne "$NTASKS" ]; then
  echo "gpart.sh: $NTASKS tasks on $NNODES nodes is uneven: use --ntasks-per-node" >&2; exit 2
fi
RESTART=${SLURM_RESTART_COUNT:-0}
LOG_DIR=${GPART_LOG_DIR:-$ROOT/logs/slurm}/${SLURM_JOB_NAME:-gpart}-${SLURM_JOB_ID}
mkdir -p "$LOG_DIR"
say() { echo "[gpart.sh $(date +%FT%T) job $SLURM_JOB_ID restart $RESTART] $*" | tee -a "$LOG_DIR/job.log"; }

# Rendezvous: rank 0 runs on the first node of the allocation.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$(( 10000 + SLURM_JOB_ID % 20000 ))}
export LOCAL_WORLD_SIZE=$TASKS_PER_NODE

# Network. NCCL's defaults are right on most clusters; these are the knobs that matter.
# WARN shows errors only; INFO prints the transports and rings NCCL picked (first thing
# to look at when a multi-node job is slow or hangs at start-up).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A failed collective aborts the rank (and with it the step) instead of hanging until the
# process-group timeout.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Use InfiniBand / RoCE when the nodes have it (1 forces TCP sockets).
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
# The interface for NCCL's bootstrap and socket traffic and for gloo (CPU collectives):
# unset lets NCCL choose (it skips lo and docker*); set both to the fast fabric's name if
# the nodes have several (e.g. ib0, or an ethernet name such as eth1).
if [ -n "${GPART_IFNAME:-}" ]; then
  export NCCL_SOCKET_IFNAME=$GPART_IFNAME GLOO_SOCKET_IFNAME=$GPART_IFNAME
fi
# Host threads per rank: the CPUs SLURM gave each task, not every core of the node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then export DS_ACCELERATOR=cpu; fi

say "config $CONFIG $*; $NNODES node(s) x $TASKS_PER_NODE task(s), device $DEVICE, master $MASTER_ADDR:$MASTER_PORT, python $PY, logs $LOG_DIR"

# Fail fast, one task per node: Python and packages, GPUs, config and files, shared output.
# The same overrides as the ranks (train.resume=auto included): a requeued job's output
# folder holds its own run, which the output-folder guard must let it continue.
if ! srun --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
     --output="$LOG_DIR/preflight.log" --open-mode=append \
     "$PY" -m gpart_ds.preflight --config "$CONFIG" --nodes "$NNODES" \
     --tasks-per-node "$TASKS_PER_NODE" --device "$DEVICE" --tag "$SLURM_JOB_ID.$RESTART" train.resume=auto "$@"; then
  say "preflight failed, ranks not started:"; grep -h "FAILED\|rror" "$LOG_DIR/preflight.log" | tail -n 20 || true
  exit 3
fi

# The ranks. --wait: once one rank has ended, the others get 60 s (ranks leaving a
# finished or preempted run do so together) before SLURM ends them, so a crashed rank
# does not leave its peers waiting out the process-group timeout. Each rank logs to
# rank-<N>.log in LOG_DIR, appended across restarts.
set +e
# A stop signal can reach this shell too (scancel --full, a preemption or time limit that
# signals the whole job): without a handler bash would die here, never see the ranks' 75
# and never requeue. With one it keeps waiting for srun (which passes the signal on to the
# ranks) and then acts on their exit status.
trap 'say "stop signal: waiting for the ranks to checkpoint and exit"' TERM USR1
# shellcheck disable=SC2016  # the single-quoted variables expand in each task, not here
srun --wait=60 --output="$LOG_DIR/rank-%t.log" --open-mode=append \
  bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' gpart-rank \
  "$PY" launch/train.py --config "$CONFIG" \
  "dist.timeout_minutes=${GPART_PG_TIMEOUT_MIN:-120}" train.resume=auto "$@"
rc=$?
set -e

if [ "$rc" -eq 75 ]; then
  say "preempted: the ranks wrote a checkpoint; requeueing (the next run resumes from it)"
  if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
  say "requeue refused (JobRequeue=0 or not permitted): resubmit the same command to resume"
  exit 75
fi
say "ranks finished with exit status $rc"
exit "$rc"
