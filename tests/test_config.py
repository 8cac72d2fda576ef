"""Config loading: every bad input gets a clear error naming the key and where it is."""

import json
from pathlib import Path

import pytest

from gpart_ds.config import ConfigError, load_config, resolve_config_path, unread_method_keys
from gpart_ds.model import check_targets
from gpart_ds.zero3 import engine_config

GOOD = """\
method:
  name: gpart
  d: 64
  target_modules: all-linear
model:
  path: {model}
data:
  train: {train}
  eval: {eval}
train:
  max_steps: 2
  micro_batch_size: 2
  grad_accum: 1
  lr: 0.01
output_dir: {out}
"""


@pytest.fixture
def good(tmp_path, tiny_assets):
    text = GOOD.format(
        model=tiny_assets / "model",
        train=tiny_assets / "data" / "train.jsonl",
        eval=tiny_assets / "data" / "eval.jsonl",
        out=tmp_path / "out",
    )
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_good_config_loads_with_defaults_and_overrides(good):
    cfg = load_config(good, ["train.lr=0.5", "method.target_modules=[q_proj,v_proj]"])
    assert cfg.train.lr == 0.5 and list(cfg.method.target_modules) == ["q_proj", "v_proj"]
    assert cfg.method.seed == 0 and cfg.deepspeed["zero_optimization"]["stage"] == 3


def test_unknown_key_names_file_line_and_key(good, tmp_path):
    p = write(tmp_path, good.read_text().replace("  lr: 0.01", "  lr: 0.01\n  learning_rate: 3"))
    with pytest.raises(ConfigError, match=r"bad\.yaml:15 \('train\.learning_rate'\)"):
        load_config(p)


def test_wrong_type_names_key(good, tmp_path):
    p = write(tmp_path, good.read_text().replace("max_steps: 2", "max_steps: two"))
    with pytest.raises(ConfigError, match=r"bad\.yaml:11 \('train\.max_steps'\).*two"):
        load_config(p)


def test_bad_override_is_reported_as_command_line(good):
    with pytest.raises(ConfigError, match=r"command-line override 'train\.max_steps'"):
        load_config(good, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(good, ["train.max_steps"])
    with pytest.raises(ConfigError, match=r"command-line override 'train\.nope'"):
        load_config(good, ["train.nope=1"])


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.d=0", "method.d"),
        ("method.name=lora2", "method.name"),
        ("method.dropout=1.5", "method.dropout"),
        ("train.lr=-1", "train.lr"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=true", "train.lr"),
        ("train.adam_eps=0", "train.adam_eps"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.schedule=step", "train.schedule"),
        ("train.objective=choice", "train.objective"),
        ("train.eval_generate=sometimes", "train.eval_generate"),
        ("train.eval_generate_batch=0", "train.eval_generate_batch"),
        ("model.precision=fp16", "model.precision"),
        ("method.target_modules=[]", "method.target_modules"),
    ],
)
def test_value_errors_name_the_key(good, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(good, [override])


def test_lr_is_a_number_or_auto_also_as_yaml_reads_it(good, tmp_path):
    assert load_config(good, ["train.lr=auto"]).train.lr == "auto"
    p = write(tmp_path, good.read_text().replace("  lr: 0.01", "  lr: 5e-5"))  # YAML 1.1: a string
    assert load_config(p).train.lr == 5e-5
    p = write(tmp_path, good.read_text().replace("  lr: 0.01", "  lr: often"))
    with pytest.raises(
        ConfigError, match=r"bad\.yaml:14 \('train\.lr'\): must be a finite number > 0 or auto, got 'often'"
    ):
        load_config(p)


def test_missing_required_key(good, tmp_path):
    p = write(tmp_path, good.read_text().replace("  lr: ", "  # lr: "))
    with pytest.raises(ConfigError, match="required keys missing: train.lr"):
        load_config(p)


def test_gpart_needs_d_but_baselines_do_not(good, tmp_path):
    p = write(tmp_path, good.read_text().replace("  d: 64\n", ""))
    with pytest.raises(ConfigError, match=r"method\.d.*needs d"):
        load_config(p)
    for name in ("lora", "vera", "full"):
        assert load_config(p, [f"method.name={name}"]).method.name == name


def test_keys_the_method_does_not_read_are_named_not_refused(good):
    assert unread_method_keys(load_config(good).method) == []
    # GPart's d, set in the file, is not LoRA's; LoRA's alpha is not GPart's
    assert unread_method_keys(load_config(good, ["method.name=lora"]).method) == ["method.d=64"]
    assert unread_method_keys(load_config(good, ["method.alpha=16"]).method) == ["method.alpha=16.0"]
    # a key at its default is not reported, whoever reads it
    assert unread_method_keys(load_config(good, ["method.name=vera", "method.d=null"]).method) == []
    assert unread_method_keys(load_config(good, ["method.name=full", "method.r=4"]).method) == [
        "method.d=64",
        "method.r=4",
    ]
    # the seed is GPart's partition and VeRA's projections; LoRA and full fine-tuning have none,
    # and full fine-tuning trains every weight: no targets, no dropout of its own
    seed = ["method.seed=3"]
    assert unread_method_keys(load_config(good, seed).method) == []
    assert unread_method_keys(load_config(good, ["method.name=vera", "method.d=null", *seed]).method) == []
    assert unread_method_keys(load_config(good, ["method.name=lora", "method.d=null", *seed]).method) == seed
    full = load_config(
        good, ["method.name=full", "method.d=null", "method.dropout=0.1", "method.target_modules=[q_proj]"]
    )
    assert unread_method_keys(full.method) == ["method.target_modules=['q_proj']", "method.dropout=0.1"]


def test_missing_files_are_named(good):
    with pytest.raises(ConfigError, match=r"'model\.path'.*no Hugging Face model at '/nowhere'"):
        load_config(good, ["model.path=/nowhere"])
    with pytest.raises(ConfigError, match=r"'data\.eval'.*data file '/no/eval\.jsonl' not found"):
        load_config(good, ["data.eval=/no/eval.jsonl"])
    with pytest.raises(ConfigError, match="DeepSpeed config 'missing.json' not found"):
        load_config(good, ["deepspeed=missing.json"])
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_invalid_deepspeed_json_names_file_and_line(good, tmp_path):
    (tmp_path / "ds.json").write_text('{\n  "zero_optimization": {"stage": 3},\n  oops\n}')
    with pytest.raises(ConfigError, match=r"ds\.json:3: DeepSpeed config is not valid JSON"):
        load_config(good, ["deepspeed=ds.json"])


def test_targets_matching_nothing_and_d_above_D_fail_before_loading_weights(good):
    cfg = load_config(good, ["method.target_modules=[qkv_proj]"])
    with pytest.raises(ConfigError, match=r"matches no linear layer.*available: \['down_proj'"):
        check_targets(cfg)
    cfg = load_config(good, ["method.d=10000000"])
    with pytest.raises(ConfigError, match=r"d=10000000 exceeds D=86016"):
        check_targets(cfg)
    assert check_targets(load_config(good)).D == 86016


def test_bare_config_name_is_found_in_configs():
    assert resolve_config_path("tiny.yaml") == Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert resolve_config_path("llama70b").name == "llama70b.yaml"


def test_shipped_configs_parse():
    for name in ("tiny", "llama70b", "smollm2_rt"):
        cfg = load_config(name, check_files=False)
        assert cfg.method.name == "gpart"
    big = load_config("llama70b", check_files=False)
    assert big.method.d >= 524288 and big.model.gradient_checkpointing
    assert big.deepspeed["zero_optimization"]["stage"] == 3


def test_deepspeed_config_contradicting_the_run_config_is_refused():
    import torch

    ds = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 but the run config implies 2"):
        engine_config(ds, micro_batch=2, grad_accum=1, world=1, max_grad_norm=1.0, dtype=torch.float32)
    filled = engine_config(
        {"train_batch_size": "auto"}, micro_batch=2, grad_accum=3, world=4, max_grad_norm=0.5, dtype=torch.bfloat16
    )
    assert filled["train_batch_size"] == 24 and filled["bf16"]["enabled"] is True
    assert filled["gradient_clipping"] == 0.5 and filled["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="fp16 is not supported"):
        engine_config(
            {"fp16": {"enabled": True}}, micro_batch=1, grad_accum=1, world=1, max_grad_norm=1.0, dtype=torch.float32
        )


def test_shipped_deepspeed_json_files_are_valid():
    for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.json"):
        json.loads(p.read_text())
