"""Checkpoints of a run: the trainable parameters, their optimizer state, schedule, RNG,
data position.

The frozen base model is never written: it comes from the base model folder, so a
checkpoint of a 70B GPart run is a few times d floats (the baselines write their own
trainable parameters the same way: LoRA's factors, or every weight for full
fine-tuning). Everything is safetensors or JSON (no pickles, nothing goes through
torch.load). Layout:

    checkpoints/step-000100/
        state.safetensors     per trainable parameter NAME: NAME (working value),
                              NAME::master (fp32), NAME::exp_avg, NAME::exp_avg_sq (full)
        rng-rank<r>.safetensors   each rank's torch (and CUDA) RNG state
        state.json            step, Adam step, engine counters, scheduler, world size, the
                              targets' layout, the base model's identity (identity.py) and
                              the digest of what defines the trained delta (delta_fields)
        run_config.yaml       the config that wrote it (drift is checked on resume)
        manifest.json         every file's size and SHA-256; written last
    checkpoints/latest        name of the newest complete checkpoint

Optimizer state is stored whole (gathered from the ZeRO-3 partitions), so a run can
resume on any number of ranks. A checkpoint is written into a temporary folder and
renamed only when every rank has written its part; `latest` is replaced last.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import identity as ident
from .errors import UserError
from .fileio import sha256_file as _sha256, temp_sibling, write_atomic
from .zero3 import gathered

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
STATE_FILE = "state.safetensors"
STATE_JSON = "state.json"
RUN_CONFIG = "run_config.yaml"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used, or a resume that must not happen."""


def drift_keys(method_name: str) -> tuple[str, ...]:
    """Config keys whose change alters what the saved trainable state means."""
    from . import methods

    keys = methods.get(method_name).drift_keys if method_name in methods.names() else ("name",)
    return tuple(f"method.{k}" for k in keys) + ("model.path",)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first (temporary folders excluded)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


REQUIRED_FILES = (STATE_FILE, STATE_JSON, RUN_CONFIG)
# state.json keys a resume reads (an older or foreign file without them cannot be resumed)
_STATE_KEYS_NEEDED = {"step": int, "adam_step": (int, float), "world": int, "global_steps": int}


def _manifest_files(man_path: Path) -> dict:
    """The manifest's {file: {bytes, sha256}}; anything else is a damaged manifest."""
    try:
        manifest = json.loads(man_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{man_path}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{man_path}: not a text file") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        raise CheckpointError(
            f'{man_path}: not a checkpoint manifest (expected {{"files": {{name: '
            f'{{"bytes", "sha256"}}}}}}, got {json.dumps(manifest)[:80]})'
        )
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise CheckpointError(f"{man_path}: does not list {', '.join(missing)} (incomplete checkpoint)")
    return files


def verify(ckpt: Path) -> None:
    """Raise CheckpointError unless every file in the manifest is there and intact."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: {'not a folder' if ckpt.exists() else 'no such checkpoint folder'}")
    man_path = ckpt / MANIFEST
    if not man_path.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST} (incomplete checkpoint)")
    for name, info in _manifest_files(man_path).items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        if p.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, manifest says {info['bytes']} (truncated?)")
        if _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{p}: SHA-256 mismatch (corrupted)")


@dataclass
class Summary:
    """What a resume needs to know of a checkpoint before loading it (no tensor read)."""

    path: Path
    step: int
    state: dict  # state.json
    run_config: dict  # run_config.yaml
    shapes: dict  # tensor name in state.safetensors -> shape


def inspect(ckpt: Path) -> Summary:
    """Verify a checkpoint and check that it can be loaded: state.json has what a resume
    reads, run_config.yaml is a mapping, state.safetensors has a readable header with a
    master and Adam moments per trainable tensor, rank 0's RNG file is there. A checkpoint
    whose checksums pass but that was not written by this code fails here, by name."""
    import yaml
    from safetensors import safe_open

    ckpt = Path(ckpt)
    verify(ckpt)
    try:
        state = json.loads((ckpt / STATE_JSON).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{ckpt / STATE_JSON}: not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt / STATE_JSON}: expected a JSON object")
    for key, typ in _STATE_KEYS_NEEDED.items():
        if isinstance(state.get(key), bool) or not isinstance(state.get(key), typ):
            raise CheckpointError(
                f"{ckpt / STATE_JSON}: no valid {key!r} (got {state.get(key)!r}); "
                "not a checkpoint this version can resume"
            )
    try:
        run = yaml.safe_load((ckpt / RUN_CONFIG).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{ckpt / RUN_CONFIG}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(run, dict):
        raise CheckpointError(f"{ckpt / RUN_CONFIG}: expected a mapping")
    # Checkpoints written before digests existed record no base identity either: accepted
    # (with a warning), as their manifest still guards every byte; one that records the
    # identity must carry its digest.
    try:
        # its fields come from run_config.yaml (method.*) and state.json: both are named
        ident.check_digest(
            state.get("digest"),
            delta_fields(state, run),
            f"{ckpt} ({RUN_CONFIG}, {STATE_JSON})",
            missing_ok="base_identity" not in state,
            what="checkpoint",
        )
    except ident.IdentityError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        with safe_open(str(ckpt / STATE_FILE), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{ckpt / STATE_FILE}: unreadable ({exc})") from None
    names = [k for k in shapes if "::" not in k]
    lacking = [f"{n}::{k}" for n in names for k in _STATE_KEYS if f"{n}::{k}" not in shapes]
    if not names or lacking:
        raise CheckpointError(
            f"{ckpt / STATE_FILE}: " + (f"no optimizer state {lacking[:3]}" if lacking else "no trainable tensor")
        )
    if not (ckpt / "rng-rank0.safetensors").is_file():
        raise CheckpointError(f"{ckpt}: no rng-rank0.safetensors")
    return Summary(ckpt, state["step"], state, run, shapes)


def find_resume(root: Path) -> tuple[Summary | None, list[str]]:
    """(the newest checkpoint that verifies and can be loaded, [why each newer one was
    skipped]); each skipped one is also named in a warning."""
    skipped = []
    for ckpt in list_checkpoints(root):
        try:
            return inspect(ckpt), skipped
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", ckpt.name, exc)
            skipped.append(f"{ckpt.name}: {exc}")
    return None, skipped


def check_drift(saved_cfg: dict, cfg, where) -> None:
    """Refuse to resume when a key that changes the meaning of the trainable state differs."""
    from omegaconf import OmegaConf

    now = OmegaConf.to_container(cfg, resolve=True)
    for key in drift_keys(_get(saved_cfg, "method.name") or cfg.method.name):
        a, b = _get(saved_cfg, key), _get(now, key)
        if key == "model.path":
            a, b = str(Path(a).resolve()) if a else a, str(Path(b).resolve())
        if a != b:
            raise CheckpointError(
                f"{where(key)}: the checkpoint was trained with {key}={a!r}, this "
                f"run has {b!r}; the saved trainable state would mean something else. "
                "Start a new output_dir or restore the setting"
            )


def delta_fields(state: dict, run_config: dict) -> dict:
    """What defines a checkpoint's trained delta (its digest covers these): the method and
    its drift keys (d, seed, targets; r, alpha), the training dtype, the targets' layout and
    the base model's identity. The trainable values themselves are in the manifest."""
    name = _get(run_config, "method.name")
    fields = {
        key: _get(run_config, key) for key in drift_keys(name if isinstance(name, str) else "?") if key != "model.path"
    }
    fields.update(dtype=state.get("dtype"), layout=state.get("layout"), base_identity=state.get("base_identity"))
    return fields


def check_base(summary: Summary, model_path, where) -> None:
    """A resume refuses a base model whose weights changed since the checkpoint was written
    (edited or replaced in place: model.path itself is a drift key)."""
    rec = summary.state.get("base_identity")
    if not ident.is_identity(rec):
        return  # an earlier version's checkpoint: nothing recorded to compare with
    why = ident.differs(rec, ident.identity(model_path))
    if why:
        merged = ident.merge_record(model_path)
        raise CheckpointError(
            f"{where('model.path')}: model.path {str(model_path)!r} is not the base model checkpoint "
            f"{summary.path.name} was trained on: {why}"
            + (
                f"; it is now a merged model ({ident.MERGE_RECORD}) holding {ident.merged_what(merged)}"
                if merged is not None
                else "; its weights were changed in place since"
            )
            + ". The saved trainable state belongs to the old weights: restore them, or start a new run in "
            "another output_dir"
        )


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


# ---------------------------------------------------------------- ZeRO-3 optimizer state
def _hp_partition(engine, param, key):
    """This rank's (partition tensor, first index, valid count) of a parameter's fp32 state."""
    opt = engine.optimizer
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank = opt._get_param_partition_rank(param)
    start = rank * part.numel()
    return part, start, max(0, min(part.numel(), param.ds_numel - start))


_STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


def gather_optimizer_state(engine, param) -> dict[str, torch.Tensor]:
    """Full fp32 master and Adam moments of one parameter (collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"master": safe_get_full_fp32_param(param)}
    for key in ("exp_avg", "exp_avg_sq"):
        out[key] = safe_get_full_optimizer_state(param, key)
    return {k: v.detach().float().cpu().reshape(-1)[: param.ds_numel].clone() for k, v in out.items()}


def adam_step(engine) -> float:
    steps = [float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s]
    return steps[0] if steps else 0.0


def restore_optimizer_state(engine, params: dict, state: dict[str, torch.Tensor], step: float) -> None:
    """Scatter full per-parameter state into this rank's ZeRO-3 partitions (any world size)."""
    import deepspeed

    # torch's AdamW creates its state lazily at the first step: a fresh engine has none
    # yet, so create it (with the same dtypes AdamW would) before filling it in.
    inner = engine.optimizer.optimizer
    for p in engine.optimizer.fp32_partitioned_groups_flat:
        st = inner.state[p]
        if "exp_avg" not in st:
            st.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    for pname, param in params.items():
        for key, name in ((None, "master"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")):
            part, start, valid = _hp_partition(engine, param, key)
            part.data[:valid].copy_(state[f"{pname}::{name}"][start : start + valid].to(part.device, part.dtype))
    for s in engine.optimizer.optimizer.state.values():
        if "step" in s:
            s["step"] = torch.full_like(s["step"], step) if torch.is_tensor(s["step"]) else step
    # The working copy (what forward reads) must equal the master.
    for pname, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank() == 0:
                param.data.copy_(state[f"{pname}::master"].view(param.shape).to(param.device, param.dtype))


# ---------------------------------------------------------------- reading without an engine
@dataclass
class Checkpoint:
    """A verified checkpoint read from disk: what exports and tools need of it."""

    path: Path
    tensors: dict[str, torch.Tensor]  # trainable parameter name -> working value (fp32, flat)
    state: dict  # state.json
    run_config: dict  # run_config.yaml

    @property
    def dtype(self) -> torch.dtype | None:
        """The training dtype the run formed W0 + delta in (merges round in it)."""
        name = self.state.get("dtype")
        dt = getattr(torch, str(name), None) if name else None
        return dt if isinstance(dt, torch.dtype) else None

    # Its files, for the messages of whoever reads the values (a method's merge source).
    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def state_json_file(self) -> Path:
        return self.path / STATE_JSON

    @property
    def run_config_file(self) -> Path:
        return self.path / RUN_CONFIG


def looks_like_checkpoint(path: Path) -> bool:
    return (path / STATE_JSON).is_file() or (path / MANIFEST).is_file()


def read(ckpt: Path) -> Checkpoint:
    """Verify a checkpoint folder and read its trainable values (no optimizer state)."""
    from safetensors.torch import load_file

    info = inspect(Path(ckpt))
    try:
        full = load_file(str(info.path / STATE_FILE))
    except Exception as exc:  # verified bytes that still do not parse: written by something else
        raise CheckpointError(f"{info.path / STATE_FILE}: unreadable ({type(exc).__name__}: {exc})") from None
    return Checkpoint(info.path, {k: v for k, v in full.items() if "::" not in k}, info.state, info.run_config)


# ---------------------------------------------------------------- save / load
class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (disk full, quota, permissions) on some rank."""


def _agree_or_fail(error: str | None, tmp: Path, final: Path, root: Path, device) -> None:
    """Collective: if any rank failed, rank 0 removes the temporary folder and every rank
    raises the same error; the earlier checkpoints and `latest` are untouched."""
    from . import comm

    if comm.all_agree(error is None, device):
        return
    # Every rank reports the first failing rank's words (the file and the reason).
    first = next(((r, e) for r, e in enumerate(comm.gather_objects(error)) if e), (None, None))
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    raise CheckpointWriteError(
        f"checkpoint {final.name} could not be written (rank {first[0]}: {first[1]}); nothing of it "
        f"was kept, the earlier checkpoints are intact (latest: {latest or 'none yet'}). Free space (or fix "
        f"the folder) and resume with train.resume=auto"
    )


# Test-only: GPART_TEST_CKPT_PAUSE="STEP:SECONDS" makes the writer (rank 0) sleep once its
# checkpoint STEP is complete in the temporary folder and before it is renamed into place. The
# fault-tolerance test (tests/integration/test_fault_tolerance.py) kills the writing node in that
# window; without it, a kill lands inside a write of a few milliseconds only by chance. Unset in
# every real run: nothing changes.
TEST_PAUSE_ENV = "GPART_TEST_CKPT_PAUSE"


def _test_pause(step: int) -> None:
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec:
        return
    at, seconds = spec.split(":")
    if int(at) == step:
        import time

        log.warning("%s: pausing %s s before publishing checkpoint step %d", TEST_PAUSE_ENV, seconds, step)
        time.sleep(float(seconds))


def save(engine, params: dict, root: Path, step: int, extra: dict, run_config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `step` (collective). `params`: name -> trainable parameter.
    Returns its folder. A failure on any rank (a full disk) fails every rank with the same
    CheckpointWriteError and leaves no temporary folder; an interrupt removes it too."""
    from safetensors.torch import save_file

    from .errors import describe_failure

    rank, world = dist.get_rank(), dist.get_world_size()
    full = {}
    for pname, param in params.items():
        # One parameter at a time: only rank 0 keeps the gathered copies.
        state = gather_optimizer_state(engine, param)
        with gathered([param]):
            value = param.detach().float().cpu().reshape(-1).clone()
        if rank == 0:
            full[pname] = value
            full.update({f"{pname}::{k}": v for k, v in state.items()})
    final = step_dir(root, step)
    tmp = temp_sibling(final)
    error, current, device = None, tmp, getattr(engine, "device", None)
    try:
        try:
            if rank == 0:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
        except Exception as exc:
            error = describe_failure(exc, current)
        _agree_or_fail(error, tmp, final, root, device)
        try:
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            current = tmp / f"rng-rank{rank}.safetensors"
            save_file(rng, str(current))
            if rank == 0:
                current = tmp / STATE_FILE
                save_file(full, str(current))
                state = {
                    "step": step,
                    "adam_step": adam_step(engine),
                    "world": world,
                    "global_steps": engine.global_steps,
                    "global_samples": engine.global_samples,
                    "micro_steps": engine.micro_steps,
                    "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler else None,
                    **extra,
                }
                if "base_identity" in state:  # the digest of what defines the delta, as written
                    import yaml

                    state["digest"] = ident.digest(delta_fields(state, yaml.safe_load(run_config_yaml)))
                current = tmp / STATE_JSON
                current.write_text(json.dumps(state, indent=2) + "\n")
                current = tmp / RUN_CONFIG
                current.write_text(run_config_yaml)
        except Exception as exc:
            error = describe_failure(exc, current)
        _agree_or_fail(error, tmp, final, root, device)  # every rank's RNG file is in
        try:
            if rank == 0:
                files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
                current = tmp / MANIFEST
                current.write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
                _test_pause(step)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                current = root / LATEST
                _write_latest(root, final.name)
        except Exception as exc:
            error = describe_failure(exc, current)
        _agree_or_fail(error, tmp, final, root, device)
    except BaseException:
        if rank == 0:  # interrupted (Ctrl-C) or failed: no half-written folder stays behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        for old in list_checkpoints(root)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        remove_stale_temporaries(root, step)
    dist.barrier()
    return final


def remove_stale_temporaries(root: Path, published: int) -> list[Path]:
    """Remove the temporaries of steps before `published`, left by a writer that died while
    writing (a killed job, a lost node): none of them can become the newest checkpoint any more,
    and a full fine-tuning checkpoint's temporary is as large as the model. Returns them."""
    stale = []
    for p in root.iterdir() if root.is_dir() else ():
        # a temporary is temp_sibling() of a step folder's name: read the step back from it
        m = _STEP_RE.match(p.name.removeprefix(".").removesuffix(".tmp"))
        if m and int(m.group(1)) < published and p == temp_sibling(root / m.group(0)):
            shutil.rmtree(p, ignore_errors=True)
            stale.append(p)
    if stale:
        log.info(
            "removed %d temporary folder(s) a stopped writer left: %s", len(stale), ", ".join(p.name for p in stale)
        )
    return stale


def _write_latest(root: Path, name: str) -> None:
    write_atomic(root / LATEST, name + "\n")


def load(engine, params: dict, ckpt: Path) -> dict:
    """Restore a verified checkpoint into the engine; returns state.json's content."""
    from safetensors.torch import load_file

    rank = dist.get_rank()
    state = json.loads((ckpt / STATE_JSON).read_text())
    full = load_file(str(ckpt / STATE_FILE))
    for pname, param in params.items():
        if pname not in full:
            raise CheckpointError(
                f"{ckpt}: no state for trainable parameter {pname!r} "
                f"(the checkpoint has {sorted(k for k in full if '::' not in k)[:5]}...)"
            )
        if full[pname].numel() != param.ds_numel:
            raise CheckpointError(f"{ckpt}: {pname} has {full[pname].numel()} entries, this run has {param.ds_numel}")
    restore_optimizer_state(engine, params, full, state["adam_step"])
    # Counters in this run's terms: with another number of ranks the accumulation
    # boundary (micro_steps % grad_accum) must still fall after every grad_accum micro-batches.
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["step"] * engine.train_batch_size()
    engine.micro_steps = state["step"] * engine.gradient_accumulation_steps()
    if state.get("scheduler") and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    # Same world size: every rank continues its own RNG stream; otherwise rank 0's.
    rng_file = ckpt / f"rng-rank{rank if state['world'] == dist.get_world_size() else 0}.safetensors"
    rng = load_file(str(rng_file))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return state
