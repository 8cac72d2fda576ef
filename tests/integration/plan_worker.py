"""Run under the deepspeed launcher by test_plan_memory.py: measure what the planner predicts.

    deepspeed --num_gpus N tests/integration/plan_worker.py OUT_DIR CONFIG key=value ...

Each rank sets up the real ZeRO-3 engine on the config and writes OUT_DIR/rank<r>.json:
- the bytes of its frozen partitions (ds_tensor of every base parameter) and of the
  parameters ZeRO-3 keeps whole (ds_persist);
- the d-length vectors every rank holds (theta gathered and persistent, s, theta * s) and
  theta's partitioned state in the ZeRO-3 optimizer (theta's partition, fp32 master, Adam
  moments, gradient partition);
- the bytes autograd saves in one micro-batch's forward (unique storages of the saved
  tensors, parameters excluded), without and with activation checkpointing, and the
  batch's shape. PLAN_WORKER_DEBUG=<rank> prints each saved tensor of that rank.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def saved_bytes(forward, d: int):
    """(bytes autograd keeps for backward during `forward()`, its result)."""
    import torch

    seen = {}

    def pack(t):
        # Parameters (the gathered W0, theta) are not activations; the d-length s and
        # theta*s are the planner's theta row.
        if not isinstance(t, torch.nn.Parameter) and not (t.dim() == 1 and t.numel() == d):
            st = t.untyped_storage()
            if os.environ.get("PLAN_WORKER_DEBUG") == os.environ.get("RANK") and st.data_ptr() not in seen:
                print("saved", tuple(t.shape), t.dtype, st.nbytes(), flush=True)
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    return sum(seen.values()), loss


def main():
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from gpart_ds.config import load_config
    from gpart_ds.trainer import Trainer

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, config, overrides = Path(args[0]), args[1], args[2:]
    cfg = load_config(config, overrides, check_files=False)
    trainer = Trainer(cfg)
    trainer.setup()
    theta = trainer.gmodel.gpart_theta
    d = cfg.method.d

    opt = trainer.engine.optimizer
    batch = trainer._batch(trainer.order.indices(0, 0, trainer.rank), trainer.train_set)
    trainer.engine.train()  # from_pretrained leaves the model in eval mode (no checkpointing)

    def forward():
        return trainer.engine(**batch).loss

    plain, loss = saved_bytes(forward, d)
    trainer.engine.backward(loss)
    trainer.engine.step()
    # Adam's moments exist from the first step on.
    state = sum(_nbytes(t) for t in opt.fp16_partitioned_groups_flat)
    state += sum(_nbytes(t) for t in opt.fp32_partitioned_groups_flat)
    state += sum(_nbytes(v) for s in opt.optimizer.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.dim() > 0)
    state += _nbytes(opt.grad_partitions_flat_buffer)

    trainer.gmodel.base_model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt, loss = saved_bytes(forward, d)
    # Inside the second step (ZeRO-3 keeps persistent parameters resident once it has traced
    # a step): persistent parameters and theta are gathered; s and theta * s exist.
    frozen = list(trainer.gmodel.base_model.parameters())
    partition = sum(_nbytes(p.ds_tensor) for p in frozen)
    persisted = sum(_nbytes(p.data) for p in frozen if getattr(p, "ds_persist", False))
    theta_vectors = sum(_nbytes(t) for t in (theta.data, trainer.gmodel.scales, trainer.gmodel.gpart_ctx.ts))
    trainer.engine.backward(loss)
    trainer.engine.step()

    rec = {"world": trainer.world, "partition_bytes": partition, "persisted_bytes": persisted,
           "theta_vectors_bytes": theta_vectors, "theta_partitioned_state_bytes": state,
           "saved_plain_bytes": plain, "saved_ckpt_bytes": ckpt,
           "batch_shape": list(batch["input_ids"].shape),
           "padded": bool((batch["attention_mask"] == 0).any())}
    (out / f"rank{trainer.rank}.json").write_text(json.dumps(rec))


if __name__ == "__main__":
    main()
