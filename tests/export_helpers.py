"""Small base models and adapters for the export tests, and the merge computed independently."""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from gpart_ds.methods.gpart import adapter as adapter_io, partition
from gpart_ds.targets import build_layout


def make_base(
    folder: Path,
    tokenizer_dir: Path,
    *,
    hidden=8,
    heads=2,
    kv=1,
    inter=12,
    layers=2,
    vocab=320,
    tie=False,
    dtype=torch.float32,
    seed=0,
) -> Path:
    """A random Llama saved as a Hugging Face folder (tokenizer copied from tokenizer_dir)."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # larger than init so that deltas matter in every dtype
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(Path(tokenizer_dir) / f, Path(folder) / f)
    return Path(folder)


def make_adapter(
    folder: Path,
    base: Path,
    d: int,
    seed: int,
    target_modules="all-linear",
    dtype=torch.float32,
    scale=0.3,
    theta_seed=1,
):
    from gpart_ds.targets import skeleton

    layout = build_layout(skeleton(str(base)), target_modules)
    theta = torch.randn(d, generator=torch.Generator().manual_seed(theta_seed)) * scale
    cfg = adapter_io.adapter_config(
        d=d,
        seed=seed,
        target_modules=target_modules,
        dropout=0.0,
        layout=layout,
        base_model={"name": base.name},
        dtype=dtype,
    )
    adapter_io.save_adapter(folder, theta, cfg)
    return theta, layout


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def expected_targets(base_tensors, layout, theta, seed, dtype) -> dict[str, torch.Tensor]:
    """W0 + delta for every target, by the method doc's formulas with plain torch ops:
    counts over all D positions, s = 1/sqrt(n), delta rounded to dtype, then added."""
    d = theta.numel()
    counts = torch.bincount(partition.group_ids(0, layout.D, d, seed), minlength=d)
    s = 1.0 / torch.sqrt(counts.clamp(min=1).float())
    out = {}
    for t in layout.targets:
        w0 = base_tensors[t.name + ".weight"].to(dtype)
        ids = partition.group_ids(t.offset, w0.numel(), d, seed)
        out[t.name + ".weight"] = (w0.reshape(-1) + (theta.float() * s)[ids].to(dtype)).reshape(w0.shape)
    return out


def write_reference_adapter(folder: Path, theta, d, proj_seed, target_modules, drop=(), **overrides):
    """An adapter folder as the authors' PEFT tuner writes it (config keys, tensor name);
    `drop`: keys an older version of their code did not write."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "GPART",
        "task_type": "CAUSAL_LM",
        "d": d,
        "proj_seed": proj_seed,
        "target_modules": target_modules,
        "assignment_backend": "stateless",
        "bias": "none",
        "projection_type": "partition",
        "partition_scope": "global",
        "grouping_strategy": "random",
        "isometric": True,
        "fan_in_fan_out": False,
        "gpart_dropout": 0.0,
        "init_bound": 0.0,
        "layers_to_transform": None,
        "base_model_name_or_path": None,
        **overrides,
    }
    cfg = {k: v for k, v in cfg.items() if k not in drop}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"base_model.model.gpart_theta_d": theta.float().contiguous()}, str(folder / "adapter_model.safetensors"))
