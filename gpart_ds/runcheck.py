"""Every check a run makes before it writes anything, in one order, in one place.

    checked = validate_for_run(cfg, world=8)      # the config against the model and DeepSpeed
    outputs = resolve_outputs(cfg)                 # the output folder and the resume target

`validate_for_run` needs only the model's config.json (no weights, no data, no process
group): targets match, the method's own checks pass (GPart: d <= D), `train.lr` resolves
to a finite rate, the DeepSpeed config is one gpart_ds can run. Training, --export-only,
--dry-run, the planner and the SLURM preflight call the same function, so a dry run
refuses what training refuses.

`resolve_outputs` reads the output folder and the checkpoints' manifests (never weights)
and decides, before the first byte is written:
  1. output_dir, checkpoint.dir and export.dir are folders that can be created;
  2. a new run (no train.resume) never replaces another run's results unless
     `overwrite_output_dir: true` says so;
  3. train.resume names something real: `auto` (the newest checkpoint that verifies and
     can be loaded; when checkpoints exist but none is usable, each is named and nothing
     starts over them) or a checkpoint folder that verifies;
  4. the resumed checkpoint was written with the same method, seed, targets, model
     (drift), on the same base weights (their fingerprint, identity.py: a model edited
     in place is refused), and train.max_steps is not below its step (equal: nothing
     left to train).
Every rank reaches the same verdict from the same files, so a refusal is the same on
every rank without a collective.

(Floor plan: a module of its own beside config.py and checkpoint.py: the config knows
keys, the checkpoint knows its format; this knows the order a run checks them in.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import checkpoint
from .config import ConfigError, auto_lr_caveat, export_dir, need_for, resolved_lr, where_for
from .fileio import folder_problem, overlap
from .targets import Layout

log = logging.getLogger("gpart_ds")

# What a finished or running training leaves in its output_dir: another run's results.
RESULT_FILES = ("run_config.yaml", "metrics.jsonl", "adapter", "eval_predictions.jsonl", "predictions", "tensorboard")
# Values of train.resume a user may mean as `auto`.
_AUTO_LOOKALIKES = {"auto", "latest", "last", "newest", "true", "yes", "on"}


@dataclass
class Checked:
    layout: Layout  # the targets, in canonical order
    lr: float  # train.lr resolved (auto: the method's calibrated rate at this D)
    source: str  # where the model's shapes came from (model.path, arch_config, --model-config)


def deepspeed_source(cfg: DictConfig) -> str:
    """'DeepSpeed config FILE (where deepspeed is set)', or where the inline mapping is."""
    from .config import deepspeed_file

    where = where_for(cfg)("deepspeed")
    path = deepspeed_file(cfg)
    return f"DeepSpeed config {path} ({where})" if path else f"{where}: DeepSpeed config"


def deepspeed_config(cfg: DictConfig, world: int, dtype, warn=None) -> dict:
    """The DeepSpeed config filled with what the run config owns (zero3.engine_config); a
    contradiction or a setting gpart_ds cannot run is a config error naming the JSON file
    (or the `deepspeed` key) and the DeepSpeed key. dtype None: not known here (a plan)."""
    from . import zero3

    t = cfg.train
    ds = cfg.deepspeed
    ds = OmegaConf.to_container(ds, resolve=True) if OmegaConf.is_config(ds) else ds
    try:
        return zero3.engine_config(
            ds,
            micro_batch=t.micro_batch_size,
            grad_accum=t.grad_accum,
            world=world,
            max_grad_norm=t.max_grad_norm,
            dtype=dtype,
            warn=warn,
        )
    except ValueError as exc:
        raise ConfigError(f"{deepspeed_source(cfg)}: {exc}") from None


def check_backend(cfg: DictConfig, device_type: str, environment: bool) -> None:
    """dist.backend against the device the run uses (and, where the run starts here, what
    this torch build offers): an impossible pair is named before any work, not by a
    traceback from init_process_group after the data was tokenised."""
    import torch.distributed as dist

    where = where_for(cfg)
    backend = cfg.dist.backend
    if backend == "nccl" and device_type != "cuda":
        raise ConfigError(
            f"{where('dist.backend')}: nccl needs CUDA GPUs, and this run is on {device_type} "
            "(torch sees no CUDA device); use dist.backend=auto (gloo on CPU)"
        )
    if not environment:  # planning for other machines: what this build lacks does not matter
        return
    if not dist.is_available():
        raise ConfigError(f"{where('dist.backend')}: this torch build has no torch.distributed")
    available = {"nccl": dist.is_nccl_available, "gloo": dist.is_gloo_available, "mpi": dist.is_mpi_available}
    want = backend if backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if not available[want]():
        hint = (
            " (only in torch built from source against an MPI library): launch with mpirun and keep "
            "dist.backend=auto, the ranks then come from MPI and the collectives use gloo or nccl"
            if want == "mpi"
            else ""
        )
        raise ConfigError(
            f"{where('dist.backend')}: {want} is not available in this torch build {torch_version()}{hint}"
        )


def torch_version() -> str:
    import torch

    return f"(torch {torch.__version__}{', CUDA ' + torch.version.cuda if torch.version.cuda else ', no CUDA'})"


def check_accelerator(device_type: str) -> None:
    """DS_ACCELERATOR (DeepSpeed's choice of accelerator) must be one gpart_ds runs on, and
    `cuda` only where CUDA is: exported by hand on a CPU machine, DeepSpeed failed to start
    after the data was tokenised. (cpu with a GPU visible is what the GPU tests run: the
    trainer computes on the GPU, DeepSpeed's CPU accelerator only builds its comm op.)"""
    import os

    acc = os.environ.get("DS_ACCELERATOR", "").strip()
    if not acc:
        return
    if acc not in ("cpu", "cuda"):
        raise ConfigError(
            f"environment variable DS_ACCELERATOR={acc!r}: gpart_ds runs on cuda or cpu; "
            "unset it (launch/train.py chooses)"
        )
    if acc == "cuda" and device_type != "cuda":
        raise ConfigError(
            f"environment variable DS_ACCELERATOR={acc!r}, but no CUDA device is visible here "
            f"{torch_version()}; unset DS_ACCELERATOR (launch/train.py sets cpu)"
        )


def validate_for_run(
    cfg: DictConfig,
    *,
    world: int = 1,
    device_type: str = "cpu",
    model_config: str | None = None,
    environment: bool = False,
) -> Checked:
    """The checks every way of starting a run shares (module doc); raises ConfigError.
    environment=True where the run starts on this machine (training, the SLURM preflight
    on a node): also what this machine offers (backend, DS_ACCELERATOR, the method's needs)."""
    import torch

    from .model import architecture_source, check_targets, training_dtype

    source = architecture_source(cfg, model_config)
    layout = check_targets(cfg, source)
    lr = resolved_lr(cfg, layout.D)
    if cfg.train.lr != "auto" and cfg.method.step_per_weight is not None:
        # The config's step, the override's rate: the explicit number is the user's last word.
        log.info("train.lr = %g given: method.step_per_weight (the rate of train.lr: auto) does not apply", lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"{where_for(cfg)('train.lr')}: resolves to {lr!r}; it must be a finite number > 0")
    caveat = auto_lr_caveat(cfg, layout.D)
    if caveat:
        log.info("train.lr: auto = %.3g; %s", lr, caveat)
    # With precision auto the dtype is the machine's: known where the run starts, not in a plan.
    dtype = training_dtype(cfg.model.precision, device_type) if environment or cfg.model.precision != "auto" else None
    deepspeed_config(cfg, world, dtype, warn=lambda text: log.warning("%s: %s", deepspeed_source(cfg), text))
    check_backend(cfg, device_type, environment)
    if environment:
        from . import methods

        check_accelerator(device_type)
        # What this machine must offer the method (method.kernel=triton on CPU), before the
        # data is tokenised and the process group started (the trainer asks again there).
        methods.create(cfg.method).check_environment(torch.device(device_type), need_for(where_for(cfg)))
    return Checked(layout, lr, source)


# ---------------------------------------------------------------- outputs and resume
@dataclass
class Outputs:
    """What resolve_outputs decided: where training starts and what it may replace."""

    checkpoint_root: Path
    resume: checkpoint.Summary | None = None  # the checkpoint to load (None: start at step 0)
    replace: list[Path] = field(default_factory=list)  # an earlier run's results to remove first
    skipped: list[str] = field(default_factory=list)  # damaged checkpoints passed over

    @property
    def start_step(self) -> int:
        return self.resume.step if self.resume else 0


def checkpoint_root(cfg: DictConfig) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.output_dir) / "checkpoints"


def _check_folder(path: Path, key: str, where) -> None:
    problem = folder_problem(path)
    if problem:
        raise ConfigError(f"{where(key)}: {problem}")


def earlier_results(cfg: DictConfig) -> list[Path]:
    """Another run's results in output_dir (and checkpoint.dir): what a new run would replace."""
    out = Path(cfg.output_dir)
    found = [out / name for name in RESULT_FILES if (out / name).exists()]
    found += checkpoint.list_checkpoints(checkpoint_root(cfg))
    if export_dir(cfg).exists():
        found.append(export_dir(cfg))
    latest = checkpoint_root(cfg) / checkpoint.LATEST
    if latest.is_file():
        found.append(latest)
    return found


def finished_results(cfg: DictConfig) -> list[str]:
    """What says output_dir holds a run that finished (its adapter, final verdicts, merged
    model, or a summary in metrics.jsonl), as names; a start that never got that far (a job
    preempted while loading, then requeued) leaves none of these."""
    out = Path(cfg.output_dir)
    found = [name for name in ("adapter", "eval_predictions.jsonl") if (out / name).exists()]
    if export_dir(cfg).exists():
        found.append(str(export_dir(cfg)))
    metrics = out / "metrics.jsonl"
    try:
        if metrics.is_file() and '"event": "summary"' in metrics.read_text(errors="replace"):
            found.append("metrics.jsonl with a summary")
    except OSError:
        pass
    return found


def _resume_target(cfg: DictConfig, where) -> tuple[checkpoint.Summary | None, list[str]]:
    want = cfg.train.resume
    root = checkpoint_root(cfg)
    if want == "auto":
        found, skipped = checkpoint.find_resume(root)
        if found is None and skipped:
            raise checkpoint.CheckpointError(
                f"{where('train.resume')}: train.resume=auto found checkpoints in {root} but none can be "
                "resumed: " + "; ".join(skipped) + ". Nothing was started over them: restore one, point "
                "train.resume at a checkpoint folder, or move them away to start fresh"
            )
        if found is None:
            log.info("train.resume=auto: no checkpoint in %s, starting fresh", root)
        return found, skipped
    path = Path(str(want))
    if not path.exists():
        if str(want).strip().lower() in _AUTO_LOOKALIKES:
            raise ConfigError(
                f"{where('train.resume')}: {want!r} is neither a checkpoint folder nor a "
                "resume mode; did you mean auto (lower case)?"
            )
        raise ConfigError(f"{where('train.resume')}: no such checkpoint folder {str(path)!r}")
    if not path.is_dir():
        raise ConfigError(f"{where('train.resume')}: {str(path)!r} is a file, not a checkpoint folder")
    try:
        return checkpoint.inspect(path), []
    except checkpoint.CheckpointError as exc:
        raise checkpoint.CheckpointError(f"{where('train.resume')}: cannot resume from it: {exc}") from None


def _check_no_overlap(cfg: DictConfig, where) -> None:
    """fileio.overlap's rule for a run: no output folder on the model or data it reads, the
    export and checkpoint folders inside the run's folder but never equal to (or holding)
    it, and an export never on the checkpoint it is made from."""
    inputs = {"model.path": cfg.model.path, "data.train": cfg.data.train, "data.eval": cfg.data.eval}
    resume = cfg.train.resume if cfg.train.resume not in (None, "auto") else None
    checks = [
        ("output_dir", cfg.output_dir, inputs, {}),
        ("checkpoint.dir", checkpoint_root(cfg), inputs, {"output_dir": cfg.output_dir}),
    ]
    if cfg.export.merged:
        checks.append(
            (
                "export.dir",
                export_dir(cfg),
                {**inputs, "train.resume": resume},
                {"output_dir": cfg.output_dir, "checkpoint.dir": checkpoint_root(cfg)},
            )
        )
    for key, path, reads, homes in checks:
        problem = overlap({key: path}, reads, homes)
        if problem:
            raise ConfigError(f"{where(key)}: {problem}; choose another folder")


def resolve_outputs(cfg: DictConfig, *, export_only: bool = False) -> Outputs:
    """The output folder guard and the resume target (module doc); raises a UserError."""
    where = where_for(cfg)
    out, root = Path(cfg.output_dir), checkpoint_root(cfg)
    _check_no_overlap(cfg, where)
    _check_folder(out, "output_dir", where)
    _check_folder(root, "checkpoint.dir" if cfg.checkpoint.dir else "output_dir", where)
    if cfg.export.merged:
        _check_folder(export_dir(cfg), "export.dir" if cfg.export.dir else "output_dir", where)
    plan = Outputs(root)
    overwrite = bool(cfg.get("overwrite_output_dir", False))
    want = cfg.train.resume
    # A checkpoint of another folder starts a new run here: it must not mix with (or, at a
    # later resume=auto, be overtaken by the newer checkpoints of) a run already in output_dir.
    foreign = (
        bool(want)
        and want != "auto"
        and not export_only
        and Path(str(want)).is_dir()
        and not Path(str(want)).resolve().is_relative_to(root.resolve())
    )
    if not want or foreign:
        if export_only:
            raise checkpoint.CheckpointError(
                f"{where('train.resume')}: --export-only needs train.resume=auto or a checkpoint folder"
            )
        earlier = earlier_results(cfg)
        if earlier and not overwrite:
            names = ", ".join(str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in earlier[:6])
            raise ConfigError(
                f"{where('output_dir')}: {str(out)!r} already holds another run's results ({names}"
                f"{', ...' if len(earlier) > 6 else ''}); "
                + (
                    "a run resumed from another folder's checkpoint would mix with them (and a later "
                    "resume=auto would pick their newest step). "
                    if foreign
                    else "a new run would replace them. "
                )
                + "Continue that run "
                "with train.resume=auto, choose another output_dir, or set overwrite_output_dir=true to "
                "replace them"
            )
        plan.replace = earlier
        if not foreign:
            return plan
    elif overwrite:
        raise ConfigError(
            f"{where('overwrite_output_dir')}: overwrite_output_dir=true and "
            f"train.resume={cfg.train.resume!r} contradict each other: choose one"
        )
    plan.resume, plan.skipped = _resume_target(cfg, where)
    if plan.resume is None:
        if export_only:
            raise checkpoint.CheckpointError(f"{where('train.resume')}: no complete checkpoint in {root} to export")
        finished = finished_results(cfg)
        if finished:  # resume=auto starts fresh only where no finished run would be replaced
            raise ConfigError(
                f"{where('train.resume')}: train.resume=auto found no checkpoint in {str(root)!r}, but "
                f"{str(out)!r} holds a finished run ({', '.join(finished)}); starting over would replace it. "
                "Is checkpoint.dir right? Otherwise choose another output_dir, or move the results away"
            )
        return plan
    checkpoint.check_drift(plan.resume.run_config, cfg, where)
    checkpoint.check_base(plan.resume, cfg.model.path, where)  # the same path, but the same weights?
    step, max_steps = plan.resume.step, cfg.train.max_steps
    if not export_only and max_steps < step:
        raise ConfigError(
            f"{where('train.max_steps')}: train.max_steps={max_steps} is below the step of the "
            f"checkpoint it resumes, {plan.resume.path.name} (step {step}); training on would "
            "rewrite earlier steps with later weights. Raise train.max_steps, or resume an "
            "earlier checkpoint by its folder (train.resume=PATH)"
        )
    return plan


def remove_earlier_results(plan: Outputs, cfg: DictConfig) -> None:
    """overwrite_output_dir: rank 0 removes the earlier run's results, saying so."""
    import shutil

    if not plan.replace:
        return
    log.warning(
        "overwrite_output_dir=true: removing the earlier run's results in %s: %s",
        cfg.output_dir,
        ", ".join(str(p) for p in plan.replace),
    )
    for p in plan.replace:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
