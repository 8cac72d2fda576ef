"""The few collectives the trainer, checkpoints and exports need, in one place.

Each works in a world of one (no process group) as the identity, so single-process tools
(the offline export, evaluation, tests) call the same code as a 64-rank job.
"""

from __future__ import annotations

import hashlib
import re

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_sum(values: list[float], device=None) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_max(values: dict[str, float], device=None) -> dict[str, float]:
    """Per-key maximum over ranks (every rank must pass the same keys)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def all_agree(ok: bool, device=None) -> bool:
    """True on every rank only if it is true on every rank (a failure is never hidden)."""
    return all_max({"bad": 0.0 if ok else 1.0}, device)["bad"] == 0.0


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank if it is true on any rank (e.g. a stop signal seen by one)."""
    return all_max({"flag": 1.0 if flag else 0.0}, device)["flag"] == 1.0


def check_identical(t: torch.Tensor, what: str, device=None) -> None:
    """Raise unless `t` is bit-identical on every rank (a replicated value that diverged
    is a bug that must fail loudly, not be saved)."""
    if world() == 1:
        return
    digest = int.from_bytes(hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).digest()[:7], "little")
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world())]
    dist.all_gather(every, mine)
    if len({int(x) for x in every}) != 1:
        raise RuntimeError(f"{what} differs between ranks: digests {[int(x) for x in every]}")


def sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a tensor (returned for chaining)."""
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (on every rank)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


# What gloo and NCCL say in the surviving ranks when a peer process is gone.
_PEER_LOST = re.compile(
    r"connection (reset|closed) by peer|broken pipe|NCCL communicator was aborted|"
    r"remote process exited|ncclRemoteError|socket closed|unable to write to socket",
    re.IGNORECASE,
)


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc`, raised in a collective, means another rank died."""
    return world() > 1 and bool(_PEER_LOST.search(str(exc)))
