"""What a run refuses before any work: DeepSpeed settings gpart_ds cannot run or
would ignore, backends and accelerators this machine lacks, launch variables that
contradict each other, chat data without (or refused by) a chat template. In-process; the
same end to end are the fault probes of kind `upfront` (tests/faults/cases_upfront.py)."""

import json

import pytest
import torch

from gpart_ds import data, runcheck, zero3
from gpart_ds.config import ConfigError, deepspeed_file, load_config
from gpart_ds.distributed import LaunchError, check_launch_env
from gpart_ds.errors import UserError


def _check(ds, dtype=torch.float32):
    return zero3.check_settings(ds, dtype)


@pytest.mark.parametrize(
    "ds, match",
    [
        ({"zero_optimization": {"stage": 2}}, r"zero_optimization\.stage: 2.*stage 3 only"),
        ({"zero_optimization": {"stage": True}}, r"zero_optimization\.stage"),
        ({"zero_optimization": "3"}, r"zero_optimization: must be an object"),
        ([{"zero_optimization": {"stage": 3}}], r"top level must be a JSON object"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, r"zero_force_ds_cpu_optimizer"),
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}}},
            r"offload_optimizer\.device: NVMe",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}},
            r"offload_param\.device: NVMe",
        ),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}, r"offload_param\.device"),
        ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucketsize": 1}}, r"stage3_prefetch_bucketsize"),
        ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 4}}, r"zero_hpz_partition_size"),
        ({"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": True}}, r"quantized"),
        ({"zero_optimisation": {"stage": 3}}, r"did you mean 'zero_optimization'"),
        ({"optimizer": {"type": "AdamW"}}, r"optimizer: not supported.*train\.lr"),
        ({"scheduler": {"type": "WarmupLR"}}, r"scheduler: not supported.*train\.schedule"),
        ({"bf16": {"enabled": True}}, r"bf16\.enabled: true.*fp32.*model\.precision"),
        ({"bf16": {"enabled": "yes"}}, r"bf16\.enabled: must be true, false"),
        ({"fp16": True}, r"fp16: must be an object"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, r"fp16.*together with bf16"),
        ({"bfloat16": {"enabled": True}}, r"bfloat16"),
        ({"activation_checkpointing": {}}, r"model\.gradient_checkpointing"),
        ({"tensorboard": {"enabled": True}}, r"log\.tensorboard"),
    ],
)
def test_deepspeed_settings_gpart_cannot_run_are_refused_naming_the_key(ds, match):
    with pytest.raises(ValueError, match=match):
        _check(ds)


def test_supported_settings_pass_and_are_filled():
    for ds in (
        {},
        {"zero_optimization": {"stage": 3}},
        {"zero_optimization": {"stage": "3"}},
        {
            "zero_optimization": {
                "stage": 3,
                "offload_param": {"device": "cpu", "pin_memory": True},
                "offload_optimizer": {"device": "cpu"},
            },
            "zero_force_ds_cpu_optimizer": False,
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
        },
        {"_comment": "a note", "bf16": {"enabled": False}, "steps_per_print": 5},
    ):
        _check(ds)
        filled = zero3.engine_config(ds, micro_batch=2, grad_accum=1, world=2, max_grad_norm=1.0, dtype=torch.float32)
        assert filled["zero_optimization"]["stage"] == 3 and filled["bf16"]["enabled"] is False
        assert filled.get("fp16", {}).get("enabled", False) is False
    _check({"bf16": {"enabled": True}}, torch.bfloat16)
    _check({"bf16": {"enabled": True}}, None)  # a plan: the dtype is the target machine's
    said = []
    zero3.check_settings({"some_new_deepspeed_key": 1}, torch.float32, said.append)
    assert said and "some_new_deepspeed_key" in said[0]


def test_shipped_deepspeed_json_files_pass_the_checks():
    from pathlib import Path

    for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.json"):
        zero3.check_settings(json.loads(p.read_text()), None)


@pytest.fixture
def cfg_for(tiny_assets, tmp_path):
    def make(*overrides):
        return load_config("tiny", [f"output_dir={tmp_path / 'run'}", *overrides], check_files=False)

    return make


def test_a_refusal_names_the_json_file_and_the_key(cfg_for, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg = cfg_for(f"deepspeed={ds}")
    assert deepspeed_file(cfg) == str(ds)
    assert deepspeed_file(cfg_for()).endswith("configs/ds_zero3_cpu.json")
    with pytest.raises(
        ConfigError,
        match=rf"DeepSpeed config {ds} \(command-line override 'deepspeed'\): "
        r"zero_optimization\.stage",
    ):
        runcheck.validate_for_run(cfg, world=1)
    ds.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    with pytest.raises(ConfigError, match=rf"{ds}.*gradient_accumulation_steps=4.*train\.grad_accum"):
        runcheck.validate_for_run(cfg_for(f"deepspeed={ds}"), world=1)


def test_json_that_is_no_object_or_repeats_a_key_is_refused_at_load(tiny_assets, tmp_path):
    ds = tmp_path / "ds.json"
    for text, match in (
        ("[1]", r"ds\.json: DeepSpeed config: the top level must be a JSON object"),
        ('{"bf16": {},\n "bf16": {}}', r"ds\.json:2: DeepSpeed config: duplicate key 'bf16'"),
        ("", r"ds\.json:1: DeepSpeed config is not valid JSON"),
    ):
        ds.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config("tiny", [f"deepspeed={ds}", f"output_dir={tmp_path}/run"], check_files=False)


def test_backend_and_accelerator_against_the_device(cfg_for, monkeypatch):
    with pytest.raises(ConfigError, match=r"dist\.backend.*nccl needs CUDA"):
        runcheck.validate_for_run(cfg_for("dist.backend=nccl"), device_type="cpu")
    runcheck.validate_for_run(cfg_for("dist.backend=nccl"), device_type="cuda")  # a plan for GPUs
    if not torch.distributed.is_mpi_available():
        with pytest.raises(ConfigError, match=r"dist\.backend.*mpi is not available"):
            runcheck.validate_for_run(cfg_for("dist.backend=mpi"), device_type="cpu", environment=True)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(ConfigError, match=r"DS_ACCELERATOR='cuda'.*no CUDA"):
        runcheck.validate_for_run(cfg_for(), device_type="cpu", environment=True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    runcheck.validate_for_run(cfg_for(), device_type="cpu", environment=True)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"WORLD_SIZE": "abc", "RANK": "0"}, r"WORLD_SIZE='abc'"),
        ({"RANK": "1"}, r"RANK=1 is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, r"WORLD_SIZE=2 is set but RANK is not"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, r"WORLD_SIZE=0"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, r"RANK=2 is not below WORLD_SIZE=2"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "99999"}, r"MASTER_PORT=99999"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, r"MASTER_ADDR/MASTER_PORT"),
        (
            {
                "WORLD_SIZE": "4",
                "RANK": "0",
                "LOCAL_RANK": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "h",
                "MASTER_PORT": "1",
            },
            r"LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2",
        ),
        ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_WORLD_SIZE": "2"}, r"LOCAL_WORLD_SIZE=2 exceeds WORLD_SIZE=1"),
    ],
)
def test_launch_variables_that_contradict_each_other_are_refused(env, match):
    with pytest.raises(LaunchError, match=match):
        check_launch_env(env)
    assert issubclass(LaunchError, UserError)  # exit 2 with `error:`, not a traceback


def test_launch_variables_give_the_world():
    assert check_launch_env({}) == 1
    assert (
        check_launch_env(
            {
                "WORLD_SIZE": "4",
                "RANK": "3",
                "MASTER_ADDR": "h",
                "MASTER_PORT": "29500",
                "LOCAL_RANK": "1",
                "LOCAL_WORLD_SIZE": "2",
            }
        )
        == 4
    )
    assert check_launch_env({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    assert check_launch_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) == 1  # a batch script is no rank
    assert check_launch_env({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "8"}) == 8


class _Tok:
    """A tokenizer stand-in: a chat template (jinja, as transformers renders it) or none."""

    name_or_path = "/models/m"
    eos_token_id = None

    def __init__(self, template=None):
        self.chat_template = template

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_dict=False):
        import jinja2

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = jinja2.Environment()
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )
        return [ord(c) for c in text]


def test_chat_data_without_a_template_is_refused_naming_the_file_and_model(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    )
    for fmt, flag in (("auto", False), ("chat", False)):
        with pytest.raises(data.DataError, match=rf"{p}.*tokenizer of /models/m has no chat template"):
            data.check_template(p, fmt, flag, _Tok())
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    data.check_template(pc, "auto", False, _Tok())  # no template needed
    with pytest.raises(data.DataError, match=r"data\.chat_template is true.*/models/m"):
        data.check_template(pc, "auto", True, _Tok())
    data.check_template(p, "auto", False, _Tok("{{ messages }}"))


def test_a_conversation_the_template_refuses_names_the_record(tmp_path):
    tok = _Tok(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(
        data.DataError,
        match=r"f\.jsonl:3: the chat template of /models/m refuses this "
        r"conversation \(roles \['system', 'user', 'assistant'\]\): no system",
    ):
        data.tokenize_record({"messages": msgs}, "chat", tok, 64, where="f.jsonl:3")
    ex = data.tokenize_record({"messages": msgs[1:]}, "chat", tok, 64, where="f.jsonl:4")
    assert ex.input_ids == [ord("a"), ord("b")]
