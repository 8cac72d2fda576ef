"""The run configuration's schema: every key, its type, default and help text.

The sections are dataclasses (OmegaConf type-checks a loaded YAML against them;
docs/configuration.md is generated from their help texts, config/docs.py). The `method:`
section is assembled from the methods' own configs (methods/<name>/config.py, in registry
order): one key per method.* name any method reads, its help text each reader's, so a
method's keys are written down once, in its folder, and adding a method touches no file here.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from .. import methods

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
OBJECTIVES = ("lm", "choices", "choices_lm")
EVAL_GENERATE = ("final", "always", "never")
TOO_LONG = ("error", "skip", "truncate_left")
BACKENDS = ("auto", "nccl", "gloo", "mpi")
FROZEN_PARTITIONS = ("node", "global")
FAULT_TOLERANCE = ("none", "nodes")
EXPORT_DTYPES = ("auto", "bf16", "fp16", "fp32")


def _f(default=MISSING, help: str = "", factory=None):
    """A schema field with its help text (docs/configuration.md is generated from it)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _method_section() -> type:
    """The `method:` section: `name` and the keys of every method's config, in registry
    order. A key several methods read has one type and default (checked here) and the
    help text of each ("gpart: ...; vera: ..."; said once when every reader says the same),
    and keeps the value checks its readers' fields carry (methods/base.py: option)."""
    readers: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for name, cfg_cls in methods.configs().items():
        hints = typing.get_type_hints(cfg_cls)
        for f in dataclasses.fields(cfg_cls):
            if f.name != "name":
                readers.setdefault(f.name, []).append((name, f, hints[f.name]))
    names = methods.names()
    fields = [("name", str, _f(names[0], f"{names[0]}, or a baseline: {', '.join(names[1:])} (methods/)"))]
    for key, rs in readers.items():
        (first, f0, t0), *rest = rs
        for name, f, t in rest:
            if (t, f.default) != (t0, f0.default):
                raise TypeError(
                    f"method.{key}: {first} and {name} disagree on its type or default "
                    f"({t0} = {f0.default!r}, {t} = {f.default!r}); one section holds both"
                )
        helps: dict[str, list[str]] = {}
        for name, f, _ in rs:
            helps.setdefault(f.metadata.get("help", ""), []).append(name)
        if len(helps) == 1 and len(rs) > 1:
            text = next(iter(helps))
        else:
            text = "; ".join(f"{'/'.join(ns)}: {h}" for h, ns in helps.items())
        checks = tuple(dict.fromkeys(c for _, f, _ in rs if (c := f.metadata.get("check")) is not None))
        fields.append(
            (
                key,
                t0,
                field(
                    default=f0.default, metadata={"help": text, "checks": checks, "readers": tuple(n for n, _, _ in rs)}
                ),
            )
        )
    return dataclasses.make_dataclass("MethodConfig", fields, namespace={"__module__": __name__})


# The fine-tuning method's keys: the union of the methods' own (a config switched to another
# method by an override keeps its other keys; config/checks.py names those the method does
# not read).
MethodConfig = _method_section()


@dataclass
class ModelConfig:
    path: str = _f(
        MISSING, "a local Hugging Face model folder (safetensors), or org/name[@rev] already in the Hugging Face cache"
    )
    precision: str = _f("auto", "auto | bf16 | fp32 (auto: bf16 where the accelerator has it, else fp32)")
    gradient_checkpointing: bool = _f(False, "recompute each decoder block in the backward (non-reentrant)")
    arch_config: str | None = _f(
        None,
        "a config.json (or folder) with the model's shapes, relative to the "
        "YAML file: what --dry-run and the planner use where model.path is not mounted",
    )


@dataclass
class DataConfig:
    train: str = _f(MISSING, "training records: .jsonl, .json, .csv or .parquet (docs/data.md)")
    eval: str = _f(MISSING, "held-out records, same formats")
    format: str = _f("auto", "auto | prompt_completion | chat | text")
    max_length: int = _f(512, "tokens per training sequence")
    too_long: str = _f(
        "error",
        "a record longer than max_length: error (stop, naming it) | skip (count and "
        "log them) | truncate_left (drop the prompt's oldest tokens)",
    )
    packing: bool = _f(False, "concatenate short examples into max_length rows")
    chat_template: bool = _f(False, "render prompt/completion records as a chat turn")
    add_eos: bool = _f(True, "end completions and texts with EOS (and learn it)")
    cache_dir: str = _f(".cache/tokenized", "where tokenised data is cached (shared by every rank)")


@dataclass
class TrainConfig:
    max_steps: int = _f(MISSING, "optimizer steps")
    micro_batch_size: int = _f(MISSING, "sequences per rank per micro-step")
    grad_accum: int = _f(MISSING, "micro-steps per optimizer step")
    lr: Any = _f(
        MISSING,
        "peak learning rate, or auto: the method's calibrated rate (GPart: a function of D and d, docs/lr_rule.md)",
    )
    weight_decay: float = _f(0.0, "AdamW weight decay (on theta: decay of W toward W0)")
    betas: list = _f(help="AdamW betas", factory=lambda: [0.9, 0.999])
    adam_eps: float = _f(1e-8, "AdamW eps (added to sqrt(v); a gradient far below it takes steps smaller than lr)")
    schedule: str = _f("cosine", "cosine | linear | constant, after warm-up")
    warmup_ratio: float = _f(0.0, "fraction of max_steps of linear warm-up")
    min_lr_ratio: float = _f(0.0, "final lr as a fraction of the peak")
    max_grad_norm: float = _f(1.0, "gradient clipping; 0 disables it")
    seed: int = _f(0, "data order and dropout")
    log_every: int = _f(1, "steps between progress lines")
    eval_every: int = _f(0, "steps between evaluations; 0: only before and after training")
    eval_examples: int = _f(0, "evaluate on the first N eval records; 0: all")
    eval_examples_during: int = _f(
        0,
        "records scored at the evaluations during training (every eval_every "
        "steps): the first N; 0: eval_examples. Before and after training: "
        "eval_examples (a learning curve from fewer records costs less)",
    )
    eval_micro_batch_size: int = _f(0, "0: micro_batch_size; larger amortises the delta regeneration")
    eval_before: bool = _f(
        True,
        "evaluate the base model before training (step 0: eval_examples records, the "
        "generated answers with eval_generate final/always); false skips it: the summary's "
        "*_before fields are null (not evaluated), and a resume of such a run does not evaluate "
        "either. Every method starts at the base, so runs on the same records can share one",
    )
    eval_predictions: bool = _f(
        False,
        "also write <output_dir>/predictions/step-N.jsonl at every evaluation "
        "before the last (the last is eval_predictions.jsonl): one verdict per scored "
        "record, for learning curves and paired tests",
    )
    eval_generate: str = _f(
        "final",
        "generated answers (greedy, as a server at temperature 0 gives them; "
        "answer_accuracy): final = the evaluations before and after training | always = "
        "every evaluation | never",
    )
    eval_generate_batch: int = _f(
        64,
        "records each rank decodes together for the generated answers: every "
        "decoding step gathers the ZeRO-3 weights, so few large batches cost less",
    )
    resume: str | None = _f(None, "auto (newest checkpoint that verifies) or a checkpoint folder")
    objective: str = _f(
        "lm",
        "lm: next-token loss on the completion; choices: cross-entropy among the first "
        "tokens of each record's `choices` at the answer position (ranks the label words; "
        "does not train the answer a server generates); choices_lm: both, summed",
    )


@dataclass
class CheckpointConfig:
    every_steps: int = _f(0, "steps between checkpoints (one is always written at the end); 0: only at the end")
    keep_last: int = _f(2, "checkpoints kept")
    dir: str | None = _f(None, "default: <output_dir>/checkpoints")


@dataclass
class DistConfig:
    timeout_minutes: float = _f(60.0, "process-group timeout (long: rank 0 may tokenise while others wait)")
    backend: str = _f("auto", "auto | nccl | gloo | mpi (auto: nccl with CUDA, gloo otherwise)")
    frozen_partition: str = _f(
        "node",
        "where ZeRO-3 partitions the frozen base: node (within groups of "
        "frozen_partition_size ranks, a whole copy per group, so only the trainables' "
        "gradients cross nodes) | global (over every rank: plain ZeRO-3); the same on one "
        "node; methods that train the base weights always use global (docs/scale.md)",
    )
    frozen_partition_size: int = _f(
        0,
        "ranks per frozen-partition group; 0: the ranks of one node. Divides the "
        "ranks per node, or is a multiple of them (whole nodes)",
    )
    count_comm: bool = _f(
        False,
        "count the bytes every collective moves, per process group and phase: "
        "<output_dir>/comm/comm-rank<r>.json, and the last step's in the summary "
        "(python -m gpart_ds.commcount <output_dir>/comm prints them)",
    )
    fault_tolerance: str = _f(
        "none",
        "none | nodes: every node is a replica group of its own (its own world, the "
        "frozen base partitioned within it); the trainables' gradient is averaged over the "
        "live groups through torchft, a group that dies drops out while the others train on, "
        "and one that (re)joins heals from a live one (needs the ft extra and a lighthouse: "
        "launch/sim_nodes.py --ft, slurm/gpart.sh; docs/fault_tolerance.md)",
    )
    ft_max_retries: int = _f(
        3,
        "with fault_tolerance=nodes: steps in a row that may fail to commit (a replica "
        "group failed during them; each is run again) before the run stops",
    )


@dataclass
class ExportConfig:
    merged: bool = _f(False, "write a merged Hugging Face folder at the end of training")
    dir: str | None = _f(None, "default: <output_dir>/merged")
    dtype: str = _f("auto", "auto (the training dtype: bit-exact with training) | bf16 | fp16 | fp32")
    max_shard_size: str = _f("5GB", "largest safetensors file")
    overwrite: bool = _f(False, "replace an existing export folder")


@dataclass
class LogConfig:
    tensorboard: Any = _f(
        "auto",
        "TensorBoard event files in <output_dir>/tensorboard: auto (when the "
        "tensorboard package is installed) | true | false",
    )
    wandb: bool = _f(False, "log to Weights & Biases (needs the wandb package; WANDB_MODE=offline works)")
    wandb_project: str = _f("gpart_ds", "W&B project")
    wandb_mode: str | None = _f(None, "online | offline | disabled (default: W&B's own, e.g. WANDB_MODE)")


@dataclass
class RunConfig:
    method: MethodConfig = _f(help="the fine-tuning method", factory=MethodConfig)
    model: ModelConfig = _f(help="the base model", factory=ModelConfig)
    data: DataConfig = _f(help="training and held-out data", factory=DataConfig)
    train: TrainConfig = _f(help="the optimisation", factory=TrainConfig)
    dist: DistConfig = _f(help="process groups", factory=DistConfig)
    checkpoint: CheckpointConfig = _f(help="checkpoints and resume", factory=CheckpointConfig)
    export: ExportConfig = _f(help="the merged model", factory=ExportConfig)
    log: LogConfig = _f(help="metrics sinks beside metrics.jsonl", factory=LogConfig)
    deepspeed: Any = _f(None, "a DeepSpeed JSON file (relative to the YAML file) or an inline mapping")
    output_dir: str = _f(MISSING, "where metrics, checkpoints, the adapter and the export go")
    overwrite_output_dir: bool = _f(
        False,
        "a new run (no train.resume) into an output_dir that holds another "
        "run's results replaces them (they are removed first, with a warning); "
        "false: such a run is refused",
    )
    prepare: list = _f(
        help="asset recipes that create the bundled model/data files when a path points at "
        "them and they are missing (gpart_ds/assets/, e.g. [smollm2, rotten_tomatoes])",
        factory=list,
    )
    # Filled by load_config: where the values came from, for error messages.
    config_file: str | None = _f(None, "(set by the loader)")
    overrides: list = _f(help="(set by the loader)", factory=list)
