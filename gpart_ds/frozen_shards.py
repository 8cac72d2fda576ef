"""The frozen base partitioned over a group of ranks (one node), the trainables over the world.

With `dist.frozen_partition=node` every node holds a whole copy of the frozen base,
partitioned by ZeRO-3 over its own ranks, so forward and backward gather weights over
the node's links only; the trainable parameters (GPart's theta, LoRA's factors) stay
ZeRO-3 parameters of the whole world, so their gradients are reduced over every rank and
their optimizer state is partitioned world-wide, exactly as in plain ZeRO-3.

How, with what DeepSpeed 0.19 offers (docs/scale.md says why this and not ZeRO++ hpZ):

- the model is built under `deepspeed.zero.Init(data_parallel_group=<the node group>)`:
  each frozen parameter's `ds_process_group` is that group, and DeepSpeed's gathers
  (`all_gather_coalesced` splits a fetch by group) stay inside it;
- the weights are then read shard-locally: each rank reads from the safetensors files
  exactly the flat range of each tensor it holds (no collective, nothing crosses a node);
  transformers' ZeRO-3 load would gather every module over the world and broadcast it
  from global rank 0, which is neither node-local nor possible when rank 0 is not in the
  group;
- before `deepspeed.initialize`, the parameters not yet partitioned (theta, PEFT
  factors) are converted with `zero.Init(module=..., data_parallel_group=<world>)`:
  left to `initialize`, DeepSpeed converts them with the first partitioned parameter's
  settings, i.e. into the node group, while its optimizer reduces over the world.

The trainer calls `place`, `load_base` and `place_trainables` whatever the mode; with
the world as the only group they are plain ZeRO-3 (model.load_model, no conversion).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from . import safetensors_io as stio
from .model import load_model
from .targets import ModelError
from .topology import Placement
from .zero3 import is_partitioned, local_shard, shard_range

log = logging.getLogger(__name__)


class ShardLoadError(ModelError):
    """The base model folder does not hold what the model needs (names the tensor)."""


def build_partitioned(model_path: str, dtype: torch.dtype, ds_config: dict, group):
    """The causal LM built under zero.Init over `group`, weights read shard-locally.

    Returns (model, keepalive) like model.load_model: keep `keepalive` (the
    HfDeepSpeedConfig, which tells transformers it runs under ZeRO-3) referenced.
    """
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    keepalive = HfDeepSpeedConfig(ds_config)
    hf_cfg = AutoConfig.from_pretrained(model_path)
    # The contexts transformers' own ZeRO-3 construction uses (modeling_utils._from_config),
    # with zero.Init given the group. no_init_weights: no random init (it would gather
    # every module and broadcast it from global rank 0); set_zero3_state: transformers
    # does not open a second zero.Init of its own. The dtype comes from ds_config's bf16 flag
    # (zero3.engine_config sets it from the training dtype), never from zero.Init's `dtype`
    # argument: DeepSpeed 0.19 reads that as `dtype or fp16 if fp16_supported else bf16 ...`,
    # so on an accelerator without fp16 (CPUs without AVX512-FP16, e.g. AMD EPYC) every
    # partition was bf16 whatever was asked, and an fp32 base was rounded in silence.
    with (
        no_init_weights(),
        prevent_arange_dtype_change(),
        deepspeed.zero.Init(data_parallel_group=group, config_dict_or_path=ds_config),
        set_zero3_state(),
    ):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    model.tie_weights()
    shards = map(local_shard, model.parameters())
    wrong = {str(t.dtype) for t in shards if t.is_floating_point() and t.dtype != dtype}
    if wrong:  # a shard in another dtype would round the base silently (bf16 for fp32)
        raise RuntimeError(
            f"zero.Init partitioned the frozen base as {sorted(wrong)}, not {dtype}: "
            "ds_config's bf16 flag must match the training dtype (zero3.engine_config)"
        )
    nbytes = load_shards(model, model_path, dtype)
    model.config.use_cache = False
    model.eval()  # as from_pretrained leaves it
    log.info(
        "frozen base built over a group of %d ranks; this rank read %.1f MB of its shards from %s",
        _group_size(group),
        nbytes / 1e6,
        model_path,
    )
    return model, keepalive


def _group_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group=group)


def load_shards(model: nn.Module, model_path: str | Path, dtype: torch.dtype) -> int:
    """Fill every partitioned parameter's local shard from the safetensors files.

    Reads, for each parameter, only elements [start, start + valid) of the stored tensor
    (plain pread of one contiguous byte range), converted to `dtype` as from_pretrained
    converts. Returns the bytes read. Collective-free.
    """
    header = stio.read_model_header(Path(model_path))
    fds: dict[Path, int] = {}
    nbytes = 0
    try:
        for name, p in model.named_parameters():
            st = header.get(name)
            if st is None:
                raise ShardLoadError(
                    f"{model_path}: the model's parameter {name!r} is not in its safetensors "
                    f"files (they hold e.g. {list(header)[:3]}); shard-local loading needs the "
                    "checkpoint's tensor names to be the model's parameter names"
                )
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(st.entry.shape) != shape:
                raise ShardLoadError(
                    f"{st.path}: tensor {name!r} has shape {list(st.entry.shape)}, the model expects {list(shape)}"
                )
            fd = fds.get(st.path)
            if fd is None:
                fd = fds[st.path] = os.open(st.path, os.O_RDONLY)
            start, valid = shard_range(p)
            if valid == 0:
                continue
            vals = stio.read_elements(st, start, valid, fd=fd)
            nbytes += vals.numel() * vals.element_size()
            with torch.no_grad():
                target = p.ds_tensor.data.reshape(-1)[:valid] if is_partitioned(p) else p.data.reshape(-1)
                target.copy_(vals.to(target.dtype))
        for name, b in model.named_buffers():
            st = header.get(name)
            if st is not None and b is not None:  # persistent buffers stored in the checkpoint
                with torch.no_grad():
                    b.copy_(stio.read_elements(st, 0, st.entry.numel, fd=None).view(b.shape).to(b.dtype))
    finally:
        for fd in fds.values():
            os.close(fd)
    return nbytes


def place(dist_cfg, trains_base: bool, timeout_minutes: float) -> Placement:
    """Collective: the groups of ranks the frozen base is partitioned over, and this rank's.

    A method that trains the base weights (`Method.trains_base`) has no frozen weights:
    its parameters are partitioned over the world whatever `dist.frozen_partition` says
    (their gradients are reduced over the world).
    """
    from . import comm, distributed
    from .topology import discover, partition_groups

    nodes = discover()
    mode = "global" if trains_base else dist_cfg.frozen_partition
    groups = tuple(tuple(g) for g in partition_groups(nodes, mode, dist_cfg.frozen_partition_size))
    group = distributed.subgroup(groups, timeout_minutes) if len(groups) > 1 else None
    log.info(
        "frozen base partitioned %s: %d group(s) of %d ranks over %d node(s) %s",
        "over the world" if group is None else "within groups",
        len(groups),
        len(groups[0]),
        len(nodes.nodes),
        [list(g) for g in groups] if len(groups) <= 16 else "",
    )
    return Placement(groups, comm.rank(), nodes, group)


def load_base(model_path: str, dtype: torch.dtype, ds_config: dict, placement: Placement):
    """The base model, partitioned as `placement` says: (model, keepalive) as model.load_model."""
    if placement.is_world:
        return load_model(model_path, dtype, ds_config)
    return build_partitioned(model_path, dtype, ds_config, placement.process_group)


def place_trainables(root: nn.Module, placement: Placement, ds_config: dict) -> int:
    """Before deepspeed.initialize: make every not-yet-partitioned parameter of `root` (the
    method's trainables) a ZeRO-3 parameter of the world, so that its gradient is reduced
    over every rank. Returns how many were converted; their dtype is kept (theta stays
    fp32 under bf16 training). Nothing to do when the frozen base is over the world:
    initialize converts them with the world's settings then.
    """
    if placement.is_world:
        return 0
    import deepspeed
    import torch.distributed as dist

    todo = [p for p in root.parameters() if not is_partitioned(p)]
    if todo:
        # zero.Init(module=...) converts the module's parameters that are not ZeRO-3
        # parameters yet, with this Init's group; the frozen ones keep theirs.
        deepspeed.zero.Init(module=root, data_parallel_group=dist.group.WORLD, config_dict_or_path=ds_config)
    return len(todo)
