"""Count the bytes every torch.distributed collective moves, per process group and phase.

Off by default. `dist.count_comm=true` (or GPART_COUNT_COMM=1 in the environment) installs
thin wrappers around the torch.distributed collectives before the process group starts,
so that DeepSpeed's own calls (it binds some functions when its backend is created) and
the trainer's are all seen. A wrapper records, for the outermost call only (torch's own
collectives call each other), the collective's kind, the global ranks of its group and
its payload S, then calls the original:

    all_gather*      S = the gathered (output) bytes        reduce_scatter*  S = the input bytes
    all_reduce*      S = the tensor bytes                   broadcast/reduce S = the tensor bytes
    all_to_all*      S = the bytes this rank sends          send/recv        S = the tensor bytes
    barrier          S = 0                                  *_object         counted through the
                                                                             tensor collectives they use

Records are kept per phase (the trainer names them: "setup", "eval", "step 3", ...) and
written per rank as JSON by `dump`; `summarize` turns them into intra- and inter-node
bytes per rank with the traffic model of gpart_ds.plan.cluster (the same formulas the
planner predicts with), so a measured figure and a planned one are comparable exactly.
Nothing here changes what a collective does.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections import defaultdict
from pathlib import Path

ENV = "GPART_COUNT_COMM"

# name -> (kind, function(args, kwargs) -> payload bytes)
_KINDS = {
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "_all_gather_base": "all_gather",
    "all_gather": "all_gather",
    "all_gather_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter": "reduce_scatter",
    "broadcast": "broadcast",
    "reduce": "reduce",
    "all_to_all_single": "all_to_all",
    "all_to_all": "all_to_all",
    "gather": "all_to_all",
    "scatter": "all_to_all",
    "send": "p2p",
    "recv": "p2p",
    "isend": "p2p",
    "irecv": "p2p",
    "barrier": "barrier",
    "monitored_barrier": "barrier",
}
# positional index of the group argument, where torch puts it
_GROUP_POS = {
    "all_reduce": 2,
    "all_reduce_coalesced": 2,
    "all_gather_into_tensor": 2,
    "_all_gather_base": 2,
    "all_gather": 2,
    "all_gather_coalesced": 2,
    "reduce_scatter_tensor": 3,
    "_reduce_scatter_base": 3,
    "reduce_scatter": 3,
    "broadcast": 2,
    "reduce": 3,
    "all_to_all_single": 4,
    "all_to_all": 2,
    "gather": 3,
    "scatter": 3,
    "send": 2,
    "recv": 2,
    "isend": 2,
    "irecv": 2,
    "barrier": 0,
    "monitored_barrier": 0,
}


def _nbytes(t) -> int:
    import torch

    if torch.is_tensor(t):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _arg(args, kwargs, pos: int, *names):
    if len(args) > pos:
        return args[pos]
    for n in names:
        if n in kwargs:
            return kwargs[n]
    return None


def _payload(name: str, args, kwargs) -> int:
    if name in ("all_reduce", "broadcast", "reduce", "send", "recv", "isend", "irecv"):
        return _nbytes(_arg(args, kwargs, 0, "tensor"))
    if name == "all_reduce_coalesced":
        return _nbytes(_arg(args, kwargs, 0, "tensors"))
    if name in ("all_gather_into_tensor", "_all_gather_base"):
        return _nbytes(_arg(args, kwargs, 0, "output_tensor"))
    if name == "all_gather":
        return _nbytes(_arg(args, kwargs, 0, "tensor_list"))
    if name == "all_gather_coalesced":
        return _nbytes(_arg(args, kwargs, 0, "output_tensor_lists"))
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return _nbytes(_arg(args, kwargs, 1, "input", "input_tensor"))
    if name == "reduce_scatter":
        return _nbytes(_arg(args, kwargs, 1, "input_list"))
    if name in ("all_to_all_single", "all_to_all"):
        return _nbytes(_arg(args, kwargs, 1, "input", "input_tensor_list"))
    if name in ("gather", "scatter"):
        return _nbytes(_arg(args, kwargs, 0, "tensor"))
    return 0


class Counter:
    def __init__(self):
        self.phase = "setup"
        # (phase, kind, group ranks) -> {"calls": n, "bytes": S summed, "sizes": {S: n}}
        self.records: dict = defaultdict(lambda: {"calls": 0, "bytes": 0, "sizes": defaultdict(int)})
        self._local = threading.local()
        self._groups: dict[int, tuple[int, ...]] = {}

    def _ranks(self, name, args, kwargs) -> tuple[int, ...]:
        import torch.distributed as dist

        group = _arg(args, kwargs, _GROUP_POS[name], "group")
        if not hasattr(group, "size"):  # None, or a positional argument that is not a group
            group = None
        if name in ("send", "recv", "isend", "irecv"):
            peer = _arg(args, kwargs, 1, "dst", "src")
            peer = dist.get_global_rank(group, peer) if group is not None and peer is not None else peer
            return tuple(sorted({dist.get_rank(), peer})) if peer is not None else (dist.get_rank(),)
        key = id(group)
        if key not in self._groups:
            self._groups[key] = tuple(
                dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
            )
        return self._groups[key]

    def wrap(self, name: str, fn):
        kind = _KINDS[name]

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                rec = self.records[(self.phase, kind, self._ranks(name, args, kwargs))]
                size = _payload(name, args, kwargs)
                rec["calls"] += 1
                rec["bytes"] += size
                rec["sizes"][size] += 1
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth

        counted.gpart_counted = True
        return counted

    def to_json(self) -> list[dict]:
        return [
            {
                "phase": p,
                "kind": k,
                "group": list(g),
                "calls": r["calls"],
                "bytes": r["bytes"],
                "sizes": {str(s): n for s, n in sorted(r["sizes"].items())},
            }
            for (p, k, g), r in self.records.items()
        ]


_COUNTER: Counter | None = None


def enabled(config_flag: bool = False) -> bool:
    return bool(config_flag) or os.environ.get(ENV, "").strip() not in ("", "0", "false", "no")


def install() -> Counter:
    """Wrap the collectives (idempotent). Call before deepspeed.init_distributed."""
    global _COUNTER
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    if _COUNTER is not None:
        return _COUNTER
    counter = Counter()
    for name in _KINDS:
        for mod in (c10d, dist):
            fn = getattr(mod, name, None)
            if fn is not None and not getattr(fn, "gpart_counted", False):
                setattr(mod, name, counter.wrap(name, fn))
    _COUNTER = counter
    return counter


def active() -> Counter | None:
    return _COUNTER


def phase(name: str) -> None:
    """Name what the following collectives belong to (no-op when counting is off)."""
    if _COUNTER is not None:
        _COUNTER.phase = name


def dump(out_dir: str | Path, rank: int, nodes: list[list[int]], extra: dict | None = None) -> Path | None:
    """Write this rank's records to out_dir/comm-rank<r>.json (None when counting is off)."""
    from .fileio import write_atomic

    if _COUNTER is None:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"comm-rank{rank}.json"
    write_atomic(
        path,
        json.dumps({"rank": rank, "nodes": nodes, **(extra or {}), "records": _COUNTER.to_json()}, indent=1) + "\n",
    )
    return path


def finish(out_dir: str | Path, placement) -> dict:
    """Collective, at the end of a run: every rank writes its counts (`dump`); returns
    rank 0's bytes of the last training step for the summary ({} when counting is off).
    `placement`: topology.Placement (the nodes, and the frozen base's groups)."""
    from . import comm

    if _COUNTER is None:
        return {}
    dump(out_dir, placement.rank, placement.nodes.to_json(), {"frozen_groups": [list(g) for g in placement.groups]})
    comm.barrier()
    per_phase = summarize(load(out_dir)[0])
    steps = step_phases(per_phase)
    last = per_phase[steps[-1]] if steps else {"intra": 0.0, "inter": 0.0}
    return {
        "comm_dir": str(out_dir),
        "comm_inter_node_bytes_last_step": last["inter"],
        "comm_intra_node_bytes_last_step": last["intra"],
    }


# ---------------------------------------------------------------- reading the dumps
def load(out_dir: str | Path) -> list[dict]:
    files = sorted(Path(out_dir).glob("comm-rank*.json"), key=lambda p: int(p.stem.split("rank")[1]))
    return [json.loads(p.read_text()) for p in files]


def summarize(dump_json: dict, phases=None) -> dict:
    """Bytes of one rank's dump, per phase: payload per (kind, span) and the modelled
    intra-/inter-node bytes this rank moves (gpart_ds.plan.cluster.collective_bytes).

    span: "node" for a group inside one node, "cross" for one spanning nodes.
    """
    from .plan.cluster import collective_bytes

    nodes = [tuple(n) for n in dump_json["nodes"]]
    node_of = {r: i for i, n in enumerate(nodes) for r in n}
    out: dict = {}
    for rec in dump_json["records"]:
        if phases is not None and rec["phase"] not in phases:
            continue
        group = rec["group"]
        spanned = sorted({node_of[r] for r in group})
        per_node = [sum(1 for r in group if node_of[r] == i) for i in spanned]
        ph = out.setdefault(rec["phase"], {"intra": 0.0, "inter": 0.0, "payload": {}})
        span = "node" if len(spanned) == 1 else "cross"
        key = f"{rec['kind']}/{span}"
        ph["payload"][key] = ph["payload"].get(key, 0) + rec["bytes"]
        for size, n in rec["sizes"].items():
            intra, inter = collective_bytes(rec["kind"], int(size), len(group), per_node)
            ph["intra"] += n * intra
            ph["inter"] += n * inter
    return out


def step_phases(summary: dict) -> list[str]:
    return sorted((p for p in summary if p.startswith("step ")), key=lambda p: int(p.split()[1]))


def report(comm_dir: str | Path) -> str:
    """Bytes per phase of every rank's dump: one line per step (max over ranks) and the rest."""
    dumps = load(comm_dir)
    if not dumps:
        return f"{comm_dir}: no comm-rank*.json"
    per_rank = [summarize(d) for d in dumps]
    phases = list(dict.fromkeys(p for s in per_rank for p in s))
    steps = [p for p in phases if p.startswith("step ")]
    others = [p for p in phases if not p.startswith("step ")]
    lines = [
        f"bytes moved per rank (max over {len(dumps)} ranks; nodes {dumps[0]['nodes']}, "
        f"frozen groups {dumps[0].get('frozen_groups')}), traffic model of gpart_ds.plan.cluster:",
        f"  {'phase':<12}{'inter-node':>14}{'intra-node':>14}   payload by collective/span (rank 0)",
    ]
    for p in sorted(steps, key=lambda p: int(p.split()[1])) + others:
        inter = max(s.get(p, {}).get("inter", 0.0) for s in per_rank)
        intra = max(s.get(p, {}).get("intra", 0.0) for s in per_rank)
        pay = per_rank[0].get(p, {}).get("payload", {})
        lines.append(
            f"  {p:<12}{inter:>14,.0f}{intra:>14,.0f}   " + ", ".join(f"{k} {v:,}" for k, v in sorted(pay.items()))
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m gpart_ds.commcount OUTPUT_DIR/comm: the bytes per phase of a counted run."""
    import argparse

    from .errors import UserError, run_cli

    ap = argparse.ArgumentParser(prog="python -m gpart_ds.commcount", description=main.__doc__)
    ap.add_argument("comm_dir", help="<output_dir>/comm of a run with dist.count_comm=true")
    args = ap.parse_args(argv)

    def body():
        if not any(Path(args.comm_dir).glob("comm-rank*.json")):
            raise UserError(f"{args.comm_dir}: no comm-rank*.json (run with dist.count_comm=true)")
        print(report(args.comm_dir))

    return run_cli(body)


if __name__ == "__main__":
    import sys

    sys.exit(main())
