"""What a rank of a real ZeRO-3 run holds, in the planner's terms (gpart_ds/plan.py).

Called by zero3_worker.py on every rank after training (the runs of test_zero3.py), so
the planner is checked against fp32 and bf16 runs on 1 and 2 ranks at no extra start-up.
`measure(trainer)` returns, in bytes:
- partition: the rank's frozen ZeRO-3 partitions (ds_tensor of every base parameter);
  persisted: the parameters ZeRO-3 keeps whole on every rank (ds_persist);
- theta_vectors: theta (gathered, persistent), s and theta * s;
- theta_state: theta's partitioned state in the ZeRO-3 optimizer (its partition, fp32
  master, Adam moments, gradient partition);
- saved_plain / saved_ckpt: what autograd keeps for backward in one micro-batch's
  forward (unique storages of the saved tensors, parameters excluded), without and with
  activation checkpointing; batch_shape and label_tokens of that micro-batch.
MEMORY_PROBE_DEBUG=<rank> prints every saved tensor of that rank.
"""

import os

import torch

from gpart_ds.model import enable_activation_checkpointing


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def saved_bytes(forward, d: int):
    """(bytes autograd keeps for backward during `forward()`, its result)."""
    seen = {}
    debug = os.environ.get("MEMORY_PROBE_DEBUG") == os.environ.get("RANK", "0")

    def pack(t):
        # Parameters (the gathered W0, theta) are not activations; the d-length s and
        # theta * s are the planner's theta row.
        # (GPart's int32 group ids, kept with method.reuse_ids, are activations.)
        if not isinstance(t, torch.nn.Parameter) and not (t.dim() == 1 and t.numel() == d and t.is_floating_point()):
            st = t.untyped_storage()
            if debug and st.data_ptr() not in seen:
                print("saved", tuple(t.shape), t.dtype, st.nbytes(), flush=True)
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(seen.values()), result


def measure(trainer) -> dict:
    engine, gmodel, d = trainer.engine, trainer.method.root, trainer.cfg.method.d
    base = gmodel.lm
    batch, _ = trainer._batch(trainer.order.indices(0, 0, trainer.rank), trainer.train_set)
    engine.train()

    def step(checkpointing: bool):
        if checkpointing:
            enable_activation_checkpointing(base)
        else:
            # As a run without checkpointing is set up: enabling it also made the embedding
            # output require grad (transformers' enable_input_require_grads), undo that too.
            base.activation_checkpointing_disable()
            base.disable_input_require_grads()
        nbytes, loss = saved_bytes(lambda: engine(**batch).loss, d)
        # Inside the step (ZeRO-3 has traced earlier steps): persistent parameters and
        # theta are resident, s and theta * s exist.
        resident = {
            "partition": sum(_nbytes(p.ds_tensor) for p in base.parameters()),
            "persisted": sum(_nbytes(p.data) for p in base.parameters() if getattr(p, "ds_persist", False)),
            "theta_vectors": sum(_nbytes(t) for t in (gmodel.gpart_theta.data, gmodel.scales, gmodel.gpart_ctx.ts)),
        }
        engine.backward(loss)
        engine.step()
        return nbytes, resident

    plain, resident = step(False)
    ckpt, _ = step(True)
    opt = engine.optimizer
    state = sum(_nbytes(t) for t in opt.fp16_partitioned_groups_flat)
    state += sum(_nbytes(t) for t in opt.fp32_partitioned_groups_flat)
    state += sum(
        _nbytes(v) for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
    )
    state += _nbytes(opt.grad_partitions_flat_buffer)
    return {
        "world": trainer.world,
        **resident,
        "theta_state": state,
        "saved_plain": plain,
        "saved_ckpt": ckpt,
        "batch_shape": list(batch["input_ids"].shape),
        "label_tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "padded": bool((batch["attention_mask"] == 0).any()),
    }
