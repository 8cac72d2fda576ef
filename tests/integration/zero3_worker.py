"""Run on N ranks by test_zero3.py: train, and record per-rank evidence.

    deepspeed --num_gpus N tests/integration/zero3_worker.py OUT_DIR key=value ...
    (the tests start the ranks directly: tests.helpers.run_ranks)

Each rank writes OUT_DIR/rank<r>.pt with its final theta and, for every frozen
parameter, whether its local shard was bit-identical before/after training and equal to
the matching slice of the base checkpoint file; and OUT_DIR/rank<r>.memory.json, what the
rank holds in the memory planner's terms (tests/integration/memory_probe.py).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    import torch
    from safetensors import safe_open

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from gpart_ds import zero3
    from gpart_ds.config import load_config
    from gpart_ds.trainer import Trainer
    from tests.integration import memory_probe

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, overrides = Path(args[0]), args[1:]
    cfg = load_config("configs/tiny.yaml", overrides, check_files=False)
    trainer = Trainer(cfg)
    trainer.setup()
    base = trainer.method.root.lm
    params = dict(base.named_parameters())
    before = {n: zero3.local_shard(p).clone() for n, p in params.items()}
    ranges = {n: zero3.shard_range(p) for n, p in params.items()}
    partitioned = {n: zero3.is_partitioned(p) for n, p in params.items()}

    summary = trainer.run()

    # The base checkpoint, read independently: the slice this rank should hold.
    file_ok = {}
    with safe_open(str(Path(cfg.model.path) / "model.safetensors"), "pt") as f:
        for n in params:
            start, valid = ranges[n]
            ref = f.get_tensor(n).reshape(-1)[start : start + valid]
            file_ok[n] = torch.equal(before[n], ref.to(before[n].dtype))
    unchanged = {n: torch.equal(before[n], zero3.local_shard(p)) for n, p in params.items()}
    requires_grad = {n: p.requires_grad for n, p in params.items()}
    torch.save(
        {
            "theta": trainer.method.theta(),
            "unchanged": unchanged,
            "file_ok": file_ok,
            "ranges": ranges,
            "partitioned": partitioned,
            "requires_grad": requires_grad,
            "numel": {n: int(getattr(p, "ds_numel", p.numel())) for n, p in params.items()},
            "summary": summary,
            "world": trainer.world,
        },
        out / f"rank{trainer.rank}.pt",
    )
    # After the evidence above is saved: what the rank holds, for the memory planner's test.
    (out / f"rank{trainer.rank}.memory.json").write_text(json.dumps(memory_probe.measure(trainer)))
    trainer.close()


if __name__ == "__main__":
    from gpart_ds.distributed import exit_process

    main()
    exit_process(0)  # as launch/train.py: no interpreter teardown of the process groups
