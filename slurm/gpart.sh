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
#   GPART_FT              1: fault-tolerant replica groups (also implied by the override
#                         dist.fault_tolerance=nodes; docs/fault_tolerance.md), see below
#   GPART_FT_RESTARTS     fault tolerance: how often a node's step is started again, default 3
#   GPART_LIGHTHOUSE_PORT fault tolerance: the lighthouse's port, default MASTER_PORT + 1
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
# Fault tolerance (GPART_FT=1 or dist.fault_tolerance=nodes; submit with --no-kill, so that a
# node SLURM loses does not end the allocation): a torchft lighthouse runs on the first node,
# and every node is a step of its own (srun --nodes=1 --relative=i --kill-on-bad-exit=0), its
# own world (its own MASTER_ADDR, its ranks 0..G-1) and replica group i. A node whose step
# fails (a crash, a killed rank, OOM) is started again on the same node, up to
# GPART_FT_RESTARTS times, and heals from the live ones, which train on meanwhile; a node that
# is gone stays out. The job ends 0 when a node finished the run (the one that wrote its
# outputs among them); 75 from every node requeues it as above. The lighthouse is the one
# process whose loss ends the job (the nodes' quorum then times out).
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

FT=${GPART_FT:-0} FT_ARG=0
for arg in "$@"; do if [ "$arg" = dist.fault_tolerance=nodes ]; then FT=1 FT_ARG=1; fi; done
if [ "$FT" = 1 ] && [ "$FT_ARG" = 0 ]; then set -- "$@" dist.fault_tolerance=nodes; fi

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

if [ "$FT" = 1 ]; then
  # Fault tolerance (above). The lighthouse: a quorum as soon as one replica group asks, the
  # first one waits up to 10 min for every group that heartbeats (start-ups differ), a group
  # silent for 5 s drops out.
  LH_PORT=${GPART_LIGHTHOUSE_PORT:-$(( MASTER_PORT + 1 ))}
  LH_BIN=$(dirname "$PY")/torchft_lighthouse
  if [ ! -x "$LH_BIN" ]; then LH_BIN=torchft_lighthouse; fi
  export TORCHFT_LIGHTHOUSE=http://$MASTER_ADDR:$LH_PORT GPART_FT_REPLICAS=$NNODES
  # torchft's managers log a few lines per rank and step at info; the lighthouse's quorums are worth keeping
  export RUST_LOG=${RUST_LOG:-warn}
  srun --nodes=1 --ntasks=1 --relative=0 --overlap --kill-on-bad-exit=0 --output="$LOG_DIR/lighthouse.log" \
    --open-mode=append env RUST_LOG=info "$LH_BIN" --min_replicas 1 --bind "[::]:$LH_PORT" --join_timeout_ms 600000 \
    --heartbeat_timeout_ms 5000 &
  LH_PID=$!
  trap 'say "stop signal: waiting for the nodes to checkpoint and exit"' TERM USR1
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  node_loop() {   # node $1: its step, started again while it fails
    local i=$1 tries=0 rc
    shift
    while :; do
      # shellcheck disable=SC2016  # expanded in each task
      srun --nodes=1 --relative="$i" --ntasks="$TASKS_PER_NODE" --kill-on-bad-exit=0 --wait=60 \
        --output="$LOG_DIR/node$i-rank-%t.log" --open-mode=append \
        bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' gpart-rank \
        env MASTER_ADDR="${HOSTS[$i]}" GPART_FT_REPLICA="$i" \
        "$PY" launch/train.py --config "$CONFIG" "dist.timeout_minutes=${GPART_PG_TIMEOUT_MIN:-120}" train.resume=auto "$@"
      rc=$?
      if [ "$rc" -eq 0 ] || [ "$rc" -eq 75 ] || [ "$rc" -eq 2 ] || [ "$tries" -ge "${GPART_FT_RESTARTS:-3}" ]; then
        say "node $i (${HOSTS[$i]}): exit status $rc"; return "$rc"
      fi
      tries=$(( tries + 1 ))
      say "node $i (${HOSTS[$i]}) failed (exit $rc): starting it again ($tries/${GPART_FT_RESTARTS:-3}); it heals from the live nodes"
    done
  }
  set +e
  PIDS=()
  for (( i = 0; i < NNODES; i++ )); do node_loop "$i" "$@" & PIDS+=($!); done
  CODES=()
  for pid in "${PIDS[@]}"; do
    while :; do wait "$pid"; c=$?; if kill -0 "$pid" 2>/dev/null; then continue; fi; break; done
    CODES+=("$c")
  done
  kill "$LH_PID" 2>/dev/null; wait "$LH_PID" 2>/dev/null
  set -e
  say "nodes finished with exit statuses ${CODES[*]}"
  rc=1; all75=1
  for c in "${CODES[@]}"; do
    if [ "$c" -eq 0 ]; then rc=0; fi
    if [ "$c" -ne 75 ]; then all75=0; fi
  done
  if [ "$all75" = 1 ]; then
    say "preempted: the nodes checkpointed; requeueing (the next run resumes from it)"
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
    exit 75
  fi
  exit "$rc"
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
