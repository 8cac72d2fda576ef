"""What fault tolerance across nodes (`dist.fault_tolerance: nodes`, gpart_ds/ft.py) costs per
step and saves per fault, in GPU-hours, against requeue-and-resume (docs/fault_tolerance.md).

Cost: every step waits for torchft's quorum (a round trip to the lighthouse), on every GPU:
    quorum_s x nodes x gpus_per_node per step.

Saving, per fault (one node lost, and started again):
- requeue-and-resume: the job dies and starts again whole. Every GPU waits for the start-up,
  the reload of the frozen base (base bytes per node / load bandwidth) and the re-run of the
  steps since the last checkpoint (checkpoint.every_steps / 2 on average):
      (startup_s + base_bytes / load_Bps + every_steps / 2 x step_s) x nodes x gpus_per_node
- fault-tolerant: the live nodes lose one heartbeat timeout and the step that was in flight
  (it runs again); the restarted node's own GPUs wait for its start-up, its reload and the
  heal (the trainables' partition and Adam moments from a live node, d/L x 12 bytes per rank):
      (heartbeat_s + step_s) x (nodes - 1) x gpus_per_node
      + (startup_s + base_bytes / load_Bps + heal_s) x gpus_per_node

Every figure is a parameter (python -m gpart_ds.plan --ft-* flags; FaultParams); the defaults
say where they come from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .arch import PlanError

# Median torchft quorum per step, measured with experiments/ft_cost.py on 2026-12-07 (3 simulated
# nodes x 2 CPU ranks, localhost, gloo; docs/fault_tolerance.md "Measured"): 20 ms.
QUORUM_S_MEASURED = 0.020
QUORUM_SOURCE = "median torchft quorum, experiments/ft_cost.py, 3 sim. nodes x 2 CPU ranks, 2026-12-07"


@dataclass(frozen=True)
class FaultParams:
    quorum_s: float = QUORUM_S_MEASURED  # per step, every GPU
    # slurm/gpart.sh starts the lighthouse with --heartbeat_timeout_ms 5000
    heartbeat_s: float = 5.0
    # assumed: reading the base from a parallel file system or local NVMe, per node
    load_gbps: float = 2.0
    # assumed: processes, CUDA, NCCL, DeepSpeed engine, first batch (no measurement on GPUs;
    # ~45 s for the tiny model on 2 shared CPU cores, docs/ft_cost.json)
    startup_s: float = 60.0

    def check(self) -> FaultParams:
        for k, v in asdict(self).items():
            if not v >= 0 or (k == "load_gbps" and not v > 0):
                raise PlanError(f"--ft-{k.replace('_', '-')} must be {'> 0' if k == 'load_gbps' else '>= 0'}, got {v}")
        return self


@dataclass(frozen=True)
class FaultEstimate:
    nodes: int
    gpus_per_node: int
    step_s: float
    base_bytes_per_node: float
    every_steps: float  # steps between checkpoints (max_steps when no checkpoint is written)
    heal_bytes_per_rank: float
    heal_s: float
    params: FaultParams

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def load_s(self) -> float:
        return self.base_bytes_per_node / (self.params.load_gbps * 1e9)

    @property
    def quorum_gpu_h_per_step(self) -> float:
        return self.params.quorum_s * self.gpus / 3600

    @property
    def requeue_s(self) -> float:
        """Wall time every GPU loses per fault under requeue-and-resume."""
        return self.params.startup_s + self.load_s + self.every_steps / 2 * self.step_s

    @property
    def requeue_gpu_h(self) -> float:
        return self.requeue_s * self.gpus / 3600

    @property
    def survivors_s(self) -> float:
        """Wall time each live node's GPUs lose per fault, fault-tolerant."""
        return self.params.heartbeat_s + self.step_s

    @property
    def rejoin_s(self) -> float:
        """Time the restarted node's GPUs are out: start-up, reload of the base, heal."""
        return self.params.startup_s + self.load_s + self.heal_s

    @property
    def ft_gpu_h(self) -> float:
        live = (self.nodes - 1) * self.gpus_per_node
        return (self.survivors_s * live + self.rejoin_s * self.gpus_per_node) / 3600

    @property
    def saved_gpu_h(self) -> float:
        return self.requeue_gpu_h - self.ft_gpu_h

    @property
    def break_even_steps(self) -> float:
        """Steps per fault at which the quorum's cost equals the saving (inf: never pays)."""
        q = self.quorum_gpu_h_per_step
        return self.saved_gpu_h / q if q > 0 else float("inf")

    def to_json(self) -> dict:
        return {
            "params": asdict(self.params),
            "quorum_source": QUORUM_SOURCE,
            "step_s": self.step_s,
            "base_bytes_per_node": self.base_bytes_per_node,
            "checkpoint_every_steps": self.every_steps,
            "heal_bytes_per_rank": self.heal_bytes_per_rank,
            "heal_s": self.heal_s,
            "load_s": self.load_s,
            "quorum_gpu_h_per_step": self.quorum_gpu_h_per_step,
            "requeue_s_per_gpu": self.requeue_s,
            "requeue_gpu_h_per_fault": self.requeue_gpu_h,
            "ft_survivor_s_per_gpu": self.survivors_s,
            "ft_rejoin_s": self.rejoin_s,
            "ft_gpu_h_per_fault": self.ft_gpu_h,
            "saved_gpu_h_per_fault": self.saved_gpu_h,
            "break_even_steps_per_fault": self.break_even_steps,
        }


def estimate_faults(
    *,
    nodes: int,
    gpus_per_node: int,
    step_s: float,
    base_bytes_per_node: float,
    every_steps: float,
    trainables: int,
    net_gbps: float,
    params: FaultParams = FaultParams(),
) -> FaultEstimate:
    """The per-fault and per-step figures (module doc). `trainables`: the method's trainable
    elements (GPart: d); the heal sends each rank its partition's fp32 values and two Adam
    moments (12 bytes per element) over the network at `net_gbps` per GPU."""
    if nodes < 1 or gpus_per_node < 1 or step_s < 0 or every_steps < 0:
        raise PlanError("nodes and gpus per node must be >= 1, the step time and checkpoint interval >= 0")
    heal_bytes = -(-trainables // gpus_per_node) * 12
    return FaultEstimate(
        nodes,
        gpus_per_node,
        step_s,
        float(base_bytes_per_node),
        float(every_steps),
        float(heal_bytes),
        heal_bytes / (net_gbps * 1e9),
        params.check(),
    )


def format_faults(e: FaultEstimate, method_label: str, enabled: bool) -> str:
    p = e.params
    G = e.gpus_per_node
    lines = [
        f"fault tolerance across nodes (dist.fault_tolerance=nodes, {'on' if enabled else 'off'} in this config), "
        f"{method_label}, frozen partition node, {e.nodes} node(s) x {G} GPU(s):",
        f"  cost: quorum {p.quorum_s * 1e3:g} ms per step ({QUORUM_SOURCE}; --ft-quorum-s) = "
        f"{p.quorum_s / max(e.step_s, 1e-12):.2%} of a {e.step_s:.3g} s step = "
        f"{e.quorum_gpu_h_per_step:.3g} GPU-h per step on {e.gpus} GPUs",
        f"  requeue-and-resume per fault: start-up {p.startup_s:g} s (--ft-startup-s) + reload "
        f"{e.base_bytes_per_node / 1e9:.3g} GB of base per node at {p.load_gbps:g} GB/s ({e.load_s:.3g} s, "
        f"--ft-load-gbps) + {e.every_steps:g}/2 steps since the checkpoint x {e.step_s:.3g} s "
        f"({e.every_steps / 2 * e.step_s:.3g} s) = {e.requeue_s:.4g} s x {e.gpus} GPUs = {e.requeue_gpu_h:.3g} GPU-h",
        f"  fault-tolerant per fault: heartbeat timeout {p.heartbeat_s:g} s (--ft-heartbeat-s) + the lost step "
        f"{e.step_s:.3g} s on {e.gpus - G} live GPUs; start-up + reload + heal ({e.heal_bytes_per_rank / 1e6:.3g} MB "
        f"per rank, {e.heal_s:.2g} s) = {e.rejoin_s:.4g} s on the restarted node's {G} GPUs = {e.ft_gpu_h:.3g} GPU-h",
        f"  saved per fault: {e.saved_gpu_h:.3g} GPU-h ({e.requeue_gpu_h / max(e.ft_gpu_h, 1e-12):.3g}x less); "
        f"the quorum's cost equals it after {e.break_even_steps:,.0f} steps, so fault tolerance pays when a "
        f"fault comes more often than every {e.break_even_steps:,.0f} steps "
        f"({e.break_even_steps * e.step_s / 3600:.3g} h)",
    ]
    return "\n".join(lines)
