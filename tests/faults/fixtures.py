"""Inputs the fault probes share: one tiny training run (read-only, copied by the probes
that need it), base-model variants and adapter edits.

Everything derives from the tiny asset (`python -m gpart_ds.assets tiny`): a 2-layer
Llama with hidden 64 and its "reverse the words" data. The shared run trains 4 steps on
one process with a checkpoint every 2 steps, so a probe finds checkpoints step-000002 and
step-000004, the adapter, metrics.jsonl and run_config.yaml in a copy of it.
"""

from __future__ import annotations

import copy
import json
import shutil
from functools import cached_property
from pathlib import Path

import yaml

from tests.faults.forkserver import REPO
from tests.faults.runner import Call, ForkServer, run_call

TINY = REPO / ".cache" / "tiny"
DS_JSON = REPO / "configs" / "ds_zero3_cpu.json"


def base_config(out_dir: Path, tokcache: Path) -> dict:
    """The tiny config with absolute paths: 2 steps of 4 records, 8 eval records."""
    return {
        "method": {"name": "gpart", "d": 4096, "seed": 0, "target_modules": "all-linear"},
        "model": {"path": str(TINY / "model"), "precision": "fp32"},
        "data": {
            "train": str(TINY / "data" / "train.jsonl"),
            "eval": str(TINY / "data" / "eval.jsonl"),
            "max_length": 64,
            "cache_dir": str(tokcache),
        },
        "train": {
            "max_steps": 2,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "lr": 0.05,
            "schedule": "cosine",
            "warmup_ratio": 0.1,
            "log_every": 1,
            "eval_examples": 8,
        },
        "checkpoint": {"every_steps": 0, "keep_last": 2},
        "deepspeed": str(DS_JSON),
        "output_dir": str(out_dir),
    }


def deep_update(d: dict, changes: dict) -> dict:
    out = copy.deepcopy(d)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        elif v is DELETE:
            out.pop(k, None)
        else:
            out[k] = v
    return out


DELETE = object()


class Fx:
    """Shared inputs under `root`; built lazily, each once."""

    def __init__(self, root: Path, server: ForkServer):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.server = server
        self.tokcache = self.root / "tokcache"
        self.model = TINY / "model"
        self.train = TINY / "data" / "train.jsonl"
        self.eval = TINY / "data" / "eval.jsonl"

    # ------------------------------------------------------------ configs
    def config(self, ws: Path, changes: dict | None = None) -> dict:
        return deep_update(base_config(Path(ws) / "run", self.tokcache), changes or {})

    def write_config(
        self, ws: Path, changes: dict | None = None, name: str = "cfg.yaml", text: str | None = None
    ) -> Path:
        p = Path(ws) / name
        p.write_text(text if text is not None else yaml.safe_dump(self.config(ws, changes), sort_keys=False))
        return p

    # ------------------------------------------------------------ the shared run
    @cached_property
    def base_run(self) -> Path:
        """4 steps, checkpoints at 2 and 4, adapter: the run every resume probe copies."""
        ws = self.root / "base"
        run = ws / "run"
        if (run / "adapter" / "adapter_config.json").is_file():
            return run
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir(parents=True)
        cfg = self.write_config(ws, {"train": {"max_steps": 4}, "checkpoint": {"every_steps": 2}})
        out = run_call(self.server, ws, Call("train", ["--config", cfg], timeout=600), tag="base")
        if out.rc != 0:
            raise RuntimeError(f"the shared tiny run failed (exit {out.rc}):\n{out.stderr[-4000:]}")
        return run

    def copy_run(self, ws: Path, name: str = "run") -> Path:
        dst = Path(ws) / name
        shutil.copytree(self.base_run, dst)
        return dst

    def copy_adapter(self, ws: Path, name: str = "adapter") -> Path:
        dst = Path(ws) / name
        shutil.copytree(self.base_run / "adapter", dst)
        return dst

    def copy_checkpoint(self, ws: Path, step: int = 4, name: str = "ckpt") -> Path:
        dst = Path(ws) / name
        shutil.copytree(self.base_run / "checkpoints" / f"step-{step:06d}", dst)
        return dst

    # ------------------------------------------------------------ base-model variants
    def _model_variant(self, name: str, edit) -> Path:
        """A copy of the tiny model folder changed by edit(folder, tensors, config) once."""
        from safetensors.torch import load_file, save_file

        dst = self.root / "models" / name
        if (dst / ".done").is_file():
            return dst
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(self.model, dst)
        tensors = load_file(str(dst / "model.safetensors"))
        cfg = json.loads((dst / "config.json").read_text())
        result = edit(dst, tensors, cfg)
        if result is not False:
            save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
            (dst / "config.json").write_text(json.dumps(cfg, indent=2))
        (dst / ".done").write_text("ok\n")
        return dst

    @cached_property
    def model_3layer(self) -> Path:
        """The tiny model with a third block (a copy of block 1): same shapes per target."""

        def edit(dst, t, cfg):
            for k in [k for k in t if ".layers.1." in k]:
                t[k.replace(".layers.1.", ".layers.2.")] = t[k].clone()
            cfg["num_hidden_layers"] = 3

        return self._model_variant("three_layers", edit)

    @cached_property
    def model_wide(self) -> Path:
        """Another shape: intermediate_size 160 -> 192 (the MLP weights change shape)."""
        import torch

        def edit(dst, t, cfg):
            g = torch.Generator().manual_seed(0)
            for k in list(t):
                if ".mlp.gate_proj." in k or ".mlp.up_proj." in k:
                    t[k] = torch.randn(192, t[k].shape[1], generator=g) * 0.02
                elif ".mlp.down_proj." in k:
                    t[k] = torch.randn(t[k].shape[0], 192, generator=g) * 0.02
            cfg["intermediate_size"] = 192

        return self._model_variant("wide_mlp", edit)

    @cached_property
    def model_renamed(self) -> Path:
        """A target weight stored under another name (a conversion that went wrong)."""

        def edit(dst, t, cfg):
            k = "model.layers.0.self_attn.q_proj.weight"
            t["model.layers.0.self_attn.q_proj.weight_renamed"] = t.pop(k)

        return self._model_variant("renamed_key", edit)

    @cached_property
    def model_nan(self) -> Path:
        """NaN in one element of a target weight (q_proj of block 0)."""

        def edit(dst, t, cfg):
            t["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")

        return self._model_variant("nan_weight", edit)

    @cached_property
    def model_truncated(self) -> Path:
        def edit(dst, t, cfg):
            p = dst / "model.safetensors"
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
            return False

        return self._model_variant("truncated", edit)

    @cached_property
    def model_bad_config(self) -> Path:
        def edit(dst, t, cfg):
            (dst / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
            return False

        return self._model_variant("bad_config_json", edit)

    @cached_property
    def model_no_weights(self) -> Path:
        def edit(dst, t, cfg):
            (dst / "model.safetensors").unlink()
            return False

        return self._model_variant("no_weights", edit)

    @cached_property
    def merged(self) -> Path:
        """The shared run's adapter merged offline into the tiny model (verify's input)."""
        ws = self.root / "merged_ws"
        out = ws / "merged"
        if (out / "gpart_merge.json").is_file():
            return out
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir(parents=True)
        o = run_call(
            self.server,
            ws,
            Call("export", ["--base", self.model, "--adapter", self.base_run / "adapter", "--out", out]),
            tag="merge",
        )
        if o.rc != 0:
            raise RuntimeError(f"the shared merge failed (exit {o.rc}):\n{o.stderr[-4000:]}")
        return out


# ---------------------------------------------------------------- small edits
def edit_json(path: Path, fn) -> None:
    """fn changes the parsed JSON in place (its return value is ignored)."""
    data = json.loads(Path(path).read_text())
    fn(data)
    Path(path).write_text(json.dumps(data, indent=2))


def set_theta(adapter: Path, fn, key: str = "gpart_theta") -> None:
    """Edit theta as another tool would write it: the recorded SHA-256 follows the new
    file, so what is tested is the check on the values, not the checksum."""
    from safetensors.torch import load_file, save_file

    from gpart_ds.fileio import sha256_file

    p = Path(adapter) / "adapter_model.safetensors"
    t = load_file(str(p))
    fn(t[key])
    save_file(t, str(p), metadata={"format": "pt"})
    cfg = Path(adapter) / "adapter_config.json"
    if cfg.is_file():
        edit_json(cfg, lambda c: c.update(weights_sha256=sha256_file(p)) if "weights_sha256" in c else None)


def flip_last_byte(path: Path) -> None:
    data = bytearray(Path(path).read_bytes())
    data[-3] ^= 0x10
    Path(path).write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def rewrite_manifest(ckpt: Path) -> None:
    """Make a checkpoint's manifest agree with its (edited) files again."""
    from gpart_ds.checkpoint import MANIFEST
    from gpart_ds.fileio import sha256_file as _sha256

    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(Path(ckpt).iterdir())
        if p.name != MANIFEST
    }
    m = json.loads((Path(ckpt) / MANIFEST).read_text())
    m["files"] = files
    (Path(ckpt) / MANIFEST).write_text(json.dumps(m, indent=2))


def theta_of_checkpoint(ckpt: Path):
    """The working theta a checkpoint holds (whatever name the trainable parameter has)."""
    from safetensors.torch import load_file

    t = load_file(str(Path(ckpt) / "state.safetensors"))
    names = [k for k in t if "::" not in k]
    return t[names[0]]
