"""Fault-tolerant replica groups across nodes (`dist.fault_tolerance: nodes`;
docs/fault_tolerance.md, docs/ft_feasibility.md).

Each node is its own torch.distributed world: its ZeRO-3 engine partitions the frozen base and
the trainables' optimizer state over the node's ranks, as any run does. Across nodes only the
trainables' gradient travels, through torchft: one `Manager` per rank, a lighthouse for the
quorum, a managed process group that survives a peer's death. Every step, between
`engine.backward` and `engine.step`, each rank averages its local gradient partition with the
same partition on the other live nodes (`Manager.allreduce`), writes it back
(`safe_set_local_grad`) and steps only when `Manager.should_commit()` says every participant
got the average. A node that dies drops out of the next quorum; a node that (re)joins heals
from a live peer: its fp32 partition, Adam moments and step, the engine's step counters, the
learning-rate schedule, and the manager's step, which is the data cursor (the batch of a step
is a function of the step and the replica alone). Quorum, failure detection, healing and the
transport are torchft's; this module only tells it what the state is.

The replica's place comes from the launcher: GPART_FT_REPLICA / GPART_FT_REPLICAS
(launch/sim_nodes.py --ft; slurm/gpart.sh sets them from SLURM_NODEID / SLURM_JOB_NUM_NODES,
which are read too), and TORCHFT_LIGHTHOUSE names the lighthouse (torchft's own variable).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

from . import comm
from .errors import RunFailed, UserError

log = logging.getLogger(__name__)

REPLICA_ENV, REPLICAS_ENV, LIGHTHOUSE_ENV = "GPART_FT_REPLICA", "GPART_FT_REPLICAS", "TORCHFT_LIGHTHOUSE"
MODES = ("none", "nodes")
# torchft's timeout for one collective, the commit vote and a heal's transfer.
OP_TIMEOUT = timedelta(seconds=60)


class FaultToleranceError(UserError):
    """The environment of a fault-tolerant run is incomplete (exit 2, nothing started)."""


@dataclass(frozen=True)
class ReplicaPlace:
    index: int  # this node's replica group, 0 .. count - 1
    count: int  # replica groups the job has (alive or not): the data order's width
    lighthouse: str


def _int(env: Mapping[str, str], key: str) -> int | None:
    v = env.get(key)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise FaultToleranceError(f"{key}={v!r} is not an integer") from None


def place(env: Mapping[str, str] | None = None) -> ReplicaPlace:
    """Which replica group this process belongs to, and where the lighthouse is; a clear
    error (before any weight or data is read) when torchft or the launcher's variables lack."""
    env = os.environ if env is None else env
    try:
        import torchft  # noqa: F401
    except ImportError:
        raise FaultToleranceError(
            "dist.fault_tolerance=nodes needs torchft: pip install 'gpart_ds[ft]' "
            "(launch/lock/cpu.txt and cuda.txt hold torchft 0.2.0)"
        ) from None
    index, count = _int(env, REPLICA_ENV), _int(env, REPLICAS_ENV)
    if index is None and count is None:
        index, count = _int(env, "SLURM_NODEID"), _int(env, "SLURM_JOB_NUM_NODES") or _int(env, "SLURM_NNODES")
    if index is None or count is None:
        raise FaultToleranceError(
            f"dist.fault_tolerance=nodes: set {REPLICA_ENV} (this node's replica group, 0..N-1) and {REPLICAS_ENV} "
            "(N) for every rank, or launch with launch/sim_nodes.py --ft or slurm/gpart.sh, which set them"
        )
    if not 0 <= index < count:
        raise FaultToleranceError(f"{REPLICA_ENV}={index} is outside 0..{REPLICAS_ENV}-1 = {count - 1}")
    lighthouse = env.get(LIGHTHOUSE_ENV, "")
    if not lighthouse:
        raise FaultToleranceError(
            f"dist.fault_tolerance=nodes: {LIGHTHOUSE_ENV} is not set (the torchft lighthouse's address, e.g. "
            "http://node0:29510; torchft_lighthouse --min_replicas 1 --bind [::]:29510 starts one)"
        )
    return ReplicaPlace(index, count, lighthouse)


def _adam_state(opt, flat: torch.Tensor) -> dict:
    """The client AdamW's state of one fp32 partition, created as AdamW creates it at its
    first step (zeros, step 0): a heal before any step (torchft syncs step 0 from one
    replica) must find it on both sides."""
    st = opt.optimizer.state[flat]
    if not st:
        st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
    return st


class Replicas:
    """This rank's torchft Manager and the state a joining replica heals from.

    Created right after the node's process group (before the model), so that the manager
    heartbeats while the model loads; `bind` hands it the engine once there is one."""

    def __init__(
        self,
        where: ReplicaPlace,
        *,
        rank: int,
        world: int,
        master_addr: str,
        master_port: int,
        device: torch.device,
        max_retries: int,
        quorum_timeout_s: float,
    ):
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
            logging.getLogger(name).setLevel(logging.WARNING)  # a line per rank and step otherwise
        self.where = where
        self.replica_id = f"replica{where.index}"  # torchft reads the trailing digits
        pg = ProcessGroupNCCL(timeout=OP_TIMEOUT) if device.type == "cuda" else ProcessGroupGloo(timeout=OP_TIMEOUT)
        self._fns: dict = {}
        self.engine = self.params = None
        self.manager = Manager(
            pg=pg,
            min_replica_size=1,
            replica_id=self.replica_id,
            rank=rank,
            world_size=world,
            store_addr=master_addr,
            store_port=master_port,
            lighthouse_addr=where.lighthouse,
            load_state_dict=lambda sd: self._load(sd),
            state_dict=lambda: self._save(),
            # synchronous quorum: a joining replica heals before its forward pass, so the step it
            # runs (the data cursor) and the weights it runs it with are its peers'
            use_async_quorum=False,
            timeout=OP_TIMEOUT,
            quorum_timeout=timedelta(seconds=quorum_timeout_s),
            connect_timeout=OP_TIMEOUT,
            max_retries=max_retries,
        )
        self.device = device
        self._last = None  # (participants, replica ids) of the last quorum
        self.healed_at: float | None = None

    # ------------------------------------------------------------ state
    def bind(self, engine, params: list[torch.nn.Parameter], scheduler) -> None:
        self.engine, self.params, self.scheduler = engine, params, scheduler

    def _flats(self):
        opt = self.engine.optimizer
        return opt, list(opt.fp32_partitioned_groups_flat)

    def _save(self) -> dict:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        opt, flats = self._flats()
        steps = [_adam_state(opt, f)["step"].clone() for f in flats]
        return {
            "fp32": [safe_get_local_fp32_param(p).clone() for p in self.params],
            "exp_avg": [safe_get_local_optimizer_state(p, "exp_avg").clone() for p in self.params],
            "exp_avg_sq": [safe_get_local_optimizer_state(p, "exp_avg_sq").clone() for p in self.params],
            "adam_step": steps,
            "global_steps": self.engine.global_steps,
            "global_samples": self.engine.global_samples,
            "micro_steps": self.engine.micro_steps,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "lr": [g["lr"] for g in self.engine.optimizer.param_groups],
        }

    def _load(self, sd: dict) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        t0 = time.perf_counter()
        opt, flats = self._flats()
        for f, step in zip(flats, sd["adam_step"]):
            _adam_state(opt, f)["step"] = step.clone()
        for p, fp32, m, v in zip(self.params, sd["fp32"], sd["exp_avg"], sd["exp_avg_sq"]):
            safe_set_local_fp32_param(p, fp32)
            safe_set_local_optimizer_state(p, m, "exp_avg")
            safe_set_local_optimizer_state(p, v, "exp_avg_sq")
            p.ds_tensor.data.copy_(fp32.to(p.ds_tensor.dtype))  # the model's own partition
        self.engine.global_steps = sd["global_steps"]
        self.engine.global_samples = sd["global_samples"]
        self.engine.micro_steps = sd["micro_steps"]
        if self.scheduler is not None and sd["scheduler"] is not None:
            self.scheduler.load_state_dict(sd["scheduler"])
        for g, lr in zip(self.engine.optimizer.param_groups, sd["lr"]):
            g["lr"] = lr
        self.healed_at = time.perf_counter()
        log.warning(
            "healed from a live replica: the trainables' partition, Adam state and step %d (%.2f s)",
            sd["global_steps"],
            self.healed_at - t0,
        )

    def set_step(self, step: int) -> None:
        """A run resumed from a checkpoint starts its manager at the checkpoint's step."""
        self.manager.load_state_dict({"step": step, "batches_committed": 0})

    # ------------------------------------------------------------ a step
    def begin(self) -> int:
        """The quorum of the next step (healing this replica if it is behind); its step."""
        self.healed_at = None
        self.manager.start_quorum()
        return self.manager.current_step()

    def average(self) -> list[int]:
        """Average every trainable's local gradient partition with the same partition on the
        other participants (one collective); returns the participating replica indices."""
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        grads = [safe_get_local_grad(p) for p in self.params]
        member = torch.zeros(self.where.count, dtype=torch.float32)
        member[self.where.index] = 1.0
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [member.to(grads[0].device)])
        self.manager.allreduce(flat).wait()
        n = self.manager.num_participants()
        off = 0
        for p, g in zip(self.params, grads):
            safe_set_local_grad(p, flat[off : off + g.numel()].view_as(g).to(g.dtype))
            off += g.numel()
        members = flat[off:].cpu() * n  # AVG divided the one-hot sums by n
        return [i for i, v in enumerate(members.tolist()) if round(v) >= 1]

    def commit(self) -> bool:
        """Every participant got the average: step (True); else drop this step's gradient
        and run the same step again (False). torchft ends the run after max_retries."""
        try:
            return self.manager.should_commit()
        except RuntimeError as exc:
            raise RunFailed(
                f"fault tolerance: {exc} (dist.ft_max_retries); the other replicas' logs say why the step failed"
            ) from None

    def quorum_change(self, step: int, members: list[int]) -> dict | None:
        """A metrics record when the quorum differs from the last one (None otherwise)."""
        n = self.manager.num_participants()
        now = (n, tuple(members))
        if now == self._last:
            return None
        before, self._last = self._last, now
        return {
            "event": "quorum",
            "step": step,
            "participants": n,
            "replicas": members,
            "replica": self.where.index,
            "replica_rank": self.manager.participating_rank(),
            "previous": list(before[1]) if before else None,
            "healed": self.healed_at is not None,
        }

    def digest(self) -> dict:
        """Collective over the node: SHA-256 digests (12 hex digits) of the trainables' fp32
        values and of their Adam moments, every rank's partition in rank order. Replica groups
        that agree have equal digests; metrics.jsonl carries them at every step."""
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        def sha(tensors) -> str:
            h = hashlib.sha256()
            for x in tensors:
                h.update(x.detach().float().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()

        mine = (
            sha(safe_get_local_fp32_param(p) for p in self.params),
            sha(safe_get_local_optimizer_state(p, k) for p in self.params for k in ("exp_avg", "exp_avg_sq")),
        )
        parts = comm.gather_objects(mine)
        return {
            "theta_sha": hashlib.sha256("".join(a for a, _ in parts).encode()).hexdigest()[:12],
            "adam_sha": hashlib.sha256("".join(b for _, b in parts).encode()).hexdigest()[:12],
        }

    def is_writer(self) -> bool:
        """The one replica that writes checkpoints, the adapter and the export: the first
        participant of the current quorum."""
        return self.manager.participating_rank() == 0

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)
