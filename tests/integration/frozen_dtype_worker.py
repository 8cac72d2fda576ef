"""Run by test_frozen_dtype.py on 2 ranks: build the tiny model's frozen base shard-locally
(frozen_shards.build_partitioned, the node-local path) in fp32 and in bf16 on an
accelerator that says it has no fp16, as CPUs without AVX512-FP16 (e.g. AMD EPYC) do, and
write OUT/rank<r>.json: per precision and parameter, the shard's dtype and whether it
equals the checkpoint file's slice converted to that precision, bit for bit.

    python tests/integration/frozen_dtype_worker.py OUT   (ranks started by tests.helpers.run_ranks)
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from safetensors import safe_open

    from gpart_ds import frozen_shards, zero3

    out = Path(sys.argv[1])
    # DeepSpeed 0.19's zero.Init ignored an explicit dtype exactly where fp16 is missing.
    get_accelerator().is_fp16_supported = lambda: False
    deepspeed.init_distributed(dist_backend="gloo")
    model_dir = REPO / ".cache" / "tiny" / "model"
    ds = json.loads((REPO / "configs" / "ds_zero3_cpu.json").read_text())
    report = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = zero3.engine_config(
            ds, micro_batch=1, grad_accum=1, world=dist.get_world_size(), max_grad_norm=1.0, dtype=dtype
        )
        model, _keep = frozen_shards.build_partitioned(str(model_dir), dtype, cfg, dist.group.WORLD)
        rows = {}
        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            for n, p in model.named_parameters():
                shard = zero3.local_shard(p)
                start, valid = zero3.shard_range(p)
                ref = f.get_tensor(n).reshape(-1)[start : start + valid].to(dtype)
                rows[n] = {"dtype": str(shard.dtype), "equal": bool(torch.equal(shard.reshape(-1)[:valid], ref))}
        report[name] = rows
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    from gpart_ds.distributed import exit_process

    main()
    exit_process(0)  # as launch/train.py: no interpreter teardown of the process groups
