"""Fault probes, round two (output ownership, identity, up-front refusals), kind `upfront`:
What the project does not support, refused before any work: DeepSpeed JSON settings
(ZeRO stage other than 3, offload), an unavailable backend, chat data without a template.

Each refusal is exit 2 with an `error:` line naming the file and the key (the DeepSpeed
JSON and its key, dist.backend, the launch variable, the data file and the model), from
training, --dry-run, the planner and the SLURM preflight alike (runcheck.validate_for_run).
Where a probe trains, its data cache is its own folder (`tokc`): a refusal that comes after
the data was tokenised is not up front (`_not_tokenised`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.faults.cases import case, err, ok, train, write_jsonl  # noqa: F401
from tests.faults.fixtures import deep_update
from tests.faults.runner import Call

DS = r"ds\.json"
UP = "upfront"


def _not_tokenised(ws, out):
    return "the data was tokenised before the refusal (not up front)" if (Path(ws) / "tokc").exists() else None


def _own_cache(ws, changes=None) -> dict:
    return deep_update({"data": {"cache_dir": str(Path(ws) / "tokc")}}, changes or {})


def _ds_file(ws, content, raw: str | None = None) -> Path:
    p = Path(ws) / "ds.json"
    p.write_text(raw if raw is not None else json.dumps(content, indent=1) + "\n")
    return p


def _train_ds(content, changes=None, raw=None, argv=(), env=None, overrides=()):
    """Training (or --dry-run with argv) with a DeepSpeed JSON file ws/ds.json."""

    def build(ws, fx):
        ds = _ds_file(ws, content, raw)
        c = train(
            ws, fx, _own_cache(ws, deep_update({"deepspeed": str(ds)}, changes or {})), *overrides, argv=argv, env=env
        )
        c.checks = (_not_tokenised,)
        return c

    return build


def _cli_ds(cli, content, changes=None):
    """python -m gpart_ds.plan / preflight with a DeepSpeed JSON file."""

    def build(ws, fx):
        ds = _ds_file(ws, content)
        cfg = fx.write_config(ws, deep_update({"deepspeed": str(ds)}, changes or {}))
        if cli == "plan":
            return Call("plan", ["--config", cfg, "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem-gb", "80"])
        return Call(
            "preflight",
            ["--config", cfg, "--nodes", "1", "--tasks-per-node", "1", "--device", "cpu", "--wait-s", "5"],
            may_change=("run/.preflight/*",),
        )

    return build


Z3 = {"stage": 3}
# ================================================================ DeepSpeed JSON: one case per setting
for _id, _title, _content, _names in [
    (
        "stage2",
        "zero_optimization.stage: 2 (trained, then crashed while saving the checkpoint)",
        {"zero_optimization": {"stage": 2}},
        (DS, r"zero_optimization\.stage", r"\b3\b"),
    ),
    ("stage1", "zero_optimization.stage: 1", {"zero_optimization": {"stage": 1}}, (DS, r"zero_optimization\.stage")),
    (
        "stage0",
        "zero_optimization.stage: 0 (no ZeRO at all)",
        {"zero_optimization": {"stage": 0}},
        (DS, r"zero_optimization\.stage"),
    ),
    (
        "stage-null",
        "zero_optimization.stage: null",
        {"zero_optimization": {"stage": None}},
        (DS, r"zero_optimization\.stage"),
    ),
    (
        "zero-bool",
        "zero_optimization: true (DeepSpeed's old boolean form)",
        {"zero_optimization": True},
        (DS, r"zero_optimization"),
    ),
    (
        "zero-list",
        "zero_optimization: [3] (a list, not an object)",
        {"zero_optimization": [3]},
        (DS, r"zero_optimization"),
    ),
    (
        "offload-optimizer-cpu",
        "offload_optimizer device cpu without zero_force_ds_cpu_optimizer: false "
        "(DeepSpeed refused the trainer's AdamW after the model was loaded)",
        {"zero_optimization": {**Z3, "offload_optimizer": {"device": "cpu"}}},
        (DS, r"offload_optimizer", r"zero_force_ds_cpu_optimizer"),
    ),
    (
        "offload-optimizer-nvme",
        "offload_optimizer device nvme",
        {
            "zero_optimization": {**Z3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}},
            "zero_force_ds_cpu_optimizer": False,
        },
        (DS, r"offload_optimizer", r"(?i)nvme"),
    ),
    (
        "offload-param-nvme",
        "offload_param device nvme (frozen shards read from disk)",
        {"zero_optimization": {**Z3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}},
        (DS, r"offload_param", r"(?i)nvme"),
    ),
    (
        "offload-device-gpu",
        "offload_param device gpu (not a DeepSpeed offload device)",
        {"zero_optimization": {**Z3, "offload_param": {"device": "gpu"}}},
        (DS, r"offload_param\.device"),
    ),
    (
        "zero-unknown-key",
        "zero_optimization.offload_paramz (misspelt: a pydantic traceback after loading)",
        {"zero_optimization": {**Z3, "offload_paramz": {"device": "cpu"}}},
        (DS, r"offload_paramz"),
    ),
    (
        "zero-type",
        'zero_optimization.overlap_comm: "sometimes"',
        {"zero_optimization": {**Z3, "overlap_comm": "sometimes"}},
        (DS, r"overlap_comm"),
    ),
    (
        "top-typo",
        "zero_optimisation (British spelling: DeepSpeed ignored the whole section)",
        {"zero_optimisation": {"stage": 3, "offload_param": {"device": "cpu"}}},
        (DS, r"zero_optimisation", r"zero_optimization"),
    ),
    (
        "optimizer-section",
        "an optimizer section (SGD) beside the trainer's AdamW (silently ignored)",
        {"zero_optimization": Z3, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
        (DS, r"optimizer", r"train\.lr"),
    ),
    (
        "optimizer-unknown-type",
        "an optimizer section of an unknown type (Lion8bit)",
        {"zero_optimization": Z3, "optimizer": {"type": "Lion8bit"}},
        (DS, r"optimizer"),
    ),
    (
        "scheduler-section",
        "a scheduler section (WarmupLR) beside train.schedule (silently ignored)",
        {"zero_optimization": Z3, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}}},
        (DS, r"scheduler", r"train\.schedule"),
    ),
    (
        "bf16-vs-fp32",
        "bf16.enabled: true with model.precision fp32 (trained in fp32 without a word)",
        {"zero_optimization": Z3, "bf16": {"enabled": True}},
        (DS, r"bf16", r"model\.precision"),
    ),
    (
        "bf16-fp16-both",
        "bf16 and fp16 both enabled",
        {"zero_optimization": Z3, "bf16": {"enabled": True}, "fp16": {"enabled": True}},
        (DS, r"fp16"),
    ),
    ("fp16-bool", "fp16: true (not an object)", {"zero_optimization": Z3, "fp16": True}, (DS, r"fp16")),
    (
        "bf16-enabled-yes",
        'bf16.enabled: "yes"',
        {"zero_optimization": Z3, "bf16": {"enabled": "yes"}},
        (DS, r"bf16\.enabled"),
    ),
    (
        "bfloat16-alias",
        "bfloat16: {enabled: true} (DeepSpeed's alias, overridden by the bf16 the trainer sets)",
        {"zero_optimization": Z3, "bfloat16": {"enabled": True}},
        (DS, r"bfloat16"),
    ),
    ("amp", "amp: {enabled: true}", {"zero_optimization": Z3, "amp": {"enabled": True}}, (DS, r"\bamp\b")),
    (
        "grad-accum",
        "gradient_accumulation_steps: 4 while train.grad_accum is 1",
        {"zero_optimization": Z3, "gradient_accumulation_steps": 4},
        (DS, r"gradient_accumulation_steps", r"train\.grad_accum"),
    ),
    (
        "train-batch",
        "train_batch_size: 99 (no micro-batch x accumulation x ranks gives it)",
        {"zero_optimization": Z3, "train_batch_size": 99},
        (DS, r"train_batch_size"),
    ),
    (
        "micro-batch",
        "train_micro_batch_size_per_gpu: 16 while train.micro_batch_size is 4",
        {"zero_optimization": Z3, "train_micro_batch_size_per_gpu": 16},
        (DS, r"train_micro_batch_size_per_gpu", r"train\.micro_batch_size"),
    ),
    (
        "clipping",
        "gradient_clipping: 0.5 while train.max_grad_norm is 1.0",
        {"zero_optimization": Z3, "gradient_clipping": 0.5},
        (DS, r"gradient_clipping", r"train\.max_grad_norm"),
    ),
    (
        "hpz",
        "zero_hpz_partition_size: 2 (a traceback after the model was loaded)",
        {"zero_optimization": {**Z3, "zero_hpz_partition_size": 2}},
        (DS, r"zero_hpz_partition_size"),
    ),
    (
        "quantized-weights",
        "zero_quantized_weights: true (a traceback from a missing CPU op)",
        {"zero_optimization": {**Z3, "zero_quantized_weights": True}},
        (DS, r"zero_quantized_weights"),
    ),
    (
        "activation-checkpointing",
        "DeepSpeed's activation_checkpointing section (ignored: model.gradient_checkpointing is the switch)",
        {"zero_optimization": Z3, "activation_checkpointing": {"partition_activations": True}},
        (DS, r"activation_checkpointing", r"model\.gradient_checkpointing"),
    ),
    (
        "tensorboard-monitor",
        "DeepSpeed's tensorboard monitor (would write outside output_dir)",
        {"zero_optimization": Z3, "tensorboard": {"enabled": True, "output_path": "tb"}},
        (DS, r"tensorboard", r"log\.tensorboard"),
    ),
]:
    case(f"upfront-ds-{_id}", UP, "deepspeed JSON: " + _title, err(*_names), defect="deepspeed-json")(
        _train_ds(_content)
    )


@case(
    "upfront-ds-top-list",
    UP,
    "deepspeed JSON whose top level is a list",
    err(DS, r"(?i)object|list"),
    defect="deepspeed-json",
)
def _(ws, fx):
    return _train_ds(None, raw='[{"zero_optimization": {"stage": 3}}]\n')(ws, fx)


@case(
    "upfront-ds-top-string",
    UP,
    "deepspeed JSON that is a bare string",
    err(DS, r"(?i)object|str"),
    defect="deepspeed-json",
)
def _(ws, fx):
    return _train_ds(None, raw='"stage 3"\n')(ws, fx)


@case(
    "upfront-ds-dup-key",
    UP,
    "deepspeed JSON with bf16 given twice (JSON keeps the last)",
    err(DS + r":\d+", r"(?i)duplicate", r"bf16"),
    defect="deepspeed-json",
)
def _(ws, fx):
    raw = '{"zero_optimization": {"stage": 3},\n "bf16": {"enabled": "auto"},\n "bf16": {"enabled": true}}\n'
    return _train_ds(None, raw=raw)(ws, fx)


@case(
    "upfront-ds-bf16-false-vs-bf16",
    UP,
    "deepspeed JSON bf16.enabled: false with model.precision bf16",
    err(DS, r"bf16", r"model\.precision"),
    defect="deepspeed-json",
)
def _(ws, fx):
    return _train_ds({"zero_optimization": Z3, "bf16": {"enabled": False}}, changes={"model": {"precision": "bf16"}})(
        ws, fx
    )


# ---------------------------------------------------------------- the same from every command that checks
for _id, _title, _build, _names in [
    (
        "dryrun-ds-stage2",
        "--dry-run with zero_optimization.stage 2",
        _train_ds({"zero_optimization": {"stage": 2}}, argv=("--dry-run",)),
        (DS, r"zero_optimization\.stage"),
    ),
    (
        "dryrun-ds-top-list",
        "--dry-run with a DeepSpeed JSON list",
        _train_ds(None, raw="[]\n", argv=("--dry-run",)),
        (DS, r"(?i)object|list"),
    ),
    (
        "dryrun-ds-optimizer",
        "--dry-run with an optimizer section",
        _train_ds({"zero_optimization": Z3, "optimizer": {"type": "AdamW"}}, argv=("--dry-run",)),
        (DS, r"optimizer"),
    ),
    (
        "plan-ds-stage2",
        "python -m gpart_ds.plan with zero_optimization.stage 2",
        _cli_ds("plan", {"zero_optimization": {"stage": 2}}),
        (DS, r"zero_optimization\.stage"),
    ),
    (
        "plan-ds-offload-optimizer",
        "python -m gpart_ds.plan with CPU optimizer offload and no zero_force_ds_cpu_optimizer: false",
        _cli_ds("plan", {"zero_optimization": {**Z3, "offload_optimizer": {"device": "cpu"}}}),
        (DS, r"offload_optimizer"),
    ),
    (
        "plan-ds-typo",
        "python -m gpart_ds.plan with zero_optimisation (the plan read no offload at all)",
        _cli_ds("plan", {"zero_optimisation": {"stage": 3, "offload_param": {"device": "cpu"}}}),
        (DS, r"zero_optimisation"),
    ),
    (
        "preflight-ds-stage2",
        "python -m gpart_ds.preflight with zero_optimization.stage 2",
        _cli_ds("preflight", {"zero_optimization": {"stage": 2}}),
        (DS, r"zero_optimization\.stage"),
    ),
]:
    case(f"upfront-{_id}", UP, _title, err(*_names), defect="deepspeed-json")(_build)


# ================================================================ backends and the accelerator
def _train_env(changes=None, env=None, argv=(), timeout=180):
    def build(ws, fx):
        # A short process-group timeout: where today's code gets as far as a rendezvous that
        # never completes, the probe ends in minutes, not an hour.
        c = train(
            ws,
            fx,
            _own_cache(ws, deep_update({"dist": {"timeout_minutes": 0.3}}, changes or {})),
            argv=argv,
            env=env,
            timeout=timeout,
        )
        c.checks = (_not_tokenised,)
        return c

    return build


def _env(**kw):
    return {k: str(v) for k, v in kw.items()}


for _id, _title, _build, _names in [
    (
        "backend-nccl-cpu",
        "dist.backend: nccl on a machine without CUDA (a traceback after tokenising)",
        _train_env({"dist": {"backend": "nccl"}}),
        (r"dist\.backend", r"nccl", r"(?i)cuda"),
    ),
    (
        "backend-mpi",
        "dist.backend: mpi with a torch built without MPI",
        _train_env({"dist": {"backend": "mpi"}}),
        (r"dist\.backend", r"(?i)mpi"),
    ),
    (
        "dryrun-backend-nccl-cpu",
        "--dry-run with dist.backend: nccl on CPU (training here would fail)",
        _train_env({"dist": {"backend": "nccl"}}, argv=("--dry-run",)),
        (r"dist\.backend", r"nccl"),
    ),
    (
        "kernel-triton-cpu",
        "method.kernel: triton on CPU (refused only after the process group started)",
        # TRITON_INTERPRET=0: as on a user's machine (the test suite interprets Triton on CPU)
        _train_env({"method": {"kernel": "triton"}}, env={"TRITON_INTERPRET": "0"}),
        (r"method\.kernel", r"(?i)triton"),
    ),
    (
        "env-ds-accelerator-cuda",
        "DS_ACCELERATOR=cuda exported on a machine without CUDA",
        _train_env(env=_env(DS_ACCELERATOR="cuda")),
        (r"DS_ACCELERATOR", r"(?i)cuda"),
    ),
    (
        "env-ds-accelerator-xpu",
        "DS_ACCELERATOR=xpu (an accelerator gpart_ds does not run on)",
        _train_env(env=_env(DS_ACCELERATOR="xpu")),
        (r"DS_ACCELERATOR", r"xpu"),
    ),
    # ------------------------------------------------------------ the launch variables
    (
        "env-world-size-abc",
        "WORLD_SIZE=abc RANK=0 (a traceback)",
        _train_env(env=_env(WORLD_SIZE="abc", RANK=0)),
        (r"WORLD_SIZE", r"abc"),
    ),
    (
        "env-rank-without-world",
        "RANK=1 without WORLD_SIZE (ran as a world of one, as rank 0)",
        _train_env(env=_env(RANK=1)),
        (r"\bRANK\b", r"WORLD_SIZE"),
    ),
    (
        "env-world-without-rank",
        "WORLD_SIZE=2 without RANK (two hand-started processes would both be rank 0)",
        _train_env(env=_env(WORLD_SIZE=2)),
        (r"WORLD_SIZE", r"\bRANK\b"),
    ),
    (
        "env-rank-ge-world",
        "RANK=2 WORLD_SIZE=2 (ranks are 0 and 1)",
        _train_env(env=_env(RANK=2, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=29517)),
        (r"\bRANK=2\b", r"WORLD_SIZE=2"),
    ),
    ("env-world-zero", "WORLD_SIZE=0 RANK=0", _train_env(env=_env(RANK=0, WORLD_SIZE=0)), (r"WORLD_SIZE=0",)),
    (
        "env-master-port-abc",
        "MASTER_PORT=abc for a 2-rank world (a traceback after tokenising)",
        _train_env(env=_env(RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT="abc")),
        (r"MASTER_PORT", r"abc"),
    ),
    (
        "env-master-port-range",
        "MASTER_PORT=70000 (not a port)",
        _train_env(env=_env(RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=70000)),
        (r"MASTER_PORT", r"70000"),
    ),
    (
        "env-no-master",
        "RANK=0 WORLD_SIZE=2 without MASTER_ADDR/MASTER_PORT (a traceback after tokenising)",
        _train_env(env=_env(RANK=0, WORLD_SIZE=2)),
        (r"MASTER_ADDR", r"MASTER_PORT"),
    ),
    (
        "env-local-rank",
        "LOCAL_RANK=3 with LOCAL_WORLD_SIZE=2",
        _train_env(
            env=_env(RANK=0, WORLD_SIZE=4, LOCAL_RANK=3, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=29518)
        ),
        (r"LOCAL_RANK=3", r"LOCAL_WORLD_SIZE=2"),
    ),
    (
        "dryrun-env-world-abc",
        "--dry-run with WORLD_SIZE=abc (planned a world of one without a word)",
        _train_env(env=_env(WORLD_SIZE="abc", RANK=0), argv=("--dry-run",)),
        (r"WORLD_SIZE", r"abc"),
    ),
]:
    case(f"upfront-{_id}", UP, _title, err(*_names), defect="environment")(_build)


@case(
    "upfront-preflight-backend-nccl",
    UP,
    "python -m gpart_ds.preflight --device cpu with dist.backend: nccl",
    err(r"dist\.backend", r"nccl"),
    defect="environment",
)
def _(ws, fx):
    return _cli_ds("preflight", {"zero_optimization": Z3}, {"dist": {"backend": "nccl"}})(ws, fx)


# ================================================================ chat data and templates
CHAT = {"messages": [{"role": "user", "content": "Reverse: red cat"}, {"role": "assistant", "content": "cat red"}]}
SYSTEM = {"messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]}
TOOL = {"messages": [*CHAT["messages"][:1], {"role": "tool", "content": "42"}, CHAT["messages"][1]]}
ASSISTANT_FIRST = {"messages": [{"role": "assistant", "content": "Hello."}, *CHAT["messages"]]}
MODEL = r"\.cache/tiny/model|WS/tmodel"
# A template as strict as some published ones: user and assistant turns only, user first.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles are "
    "supported, got ' + m['role']) }}{% endif %}"
    "{% if loop.first and m['role'] != 'user' %}{{ raise_exception('Conversations must start with a user "
    "turn') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def _template_model(ws, fx) -> Path:
    """The tiny model with the strict chat template in its tokenizer config."""
    dst = Path(ws) / "tmodel"
    shutil.copytree(fx.model, dst)
    tc = dst / "tokenizer_config.json"
    cfg = json.loads(tc.read_text())
    cfg["chat_template"] = STRICT_TEMPLATE
    tc.write_text(json.dumps(cfg, indent=1))
    return dst


def _chat(records, which="train", changes=None, template=False, pc_train=False, check=True):
    def build(ws, fx):
        p = write_jsonl(Path(ws) / f"{which}.jsonl", records * 8)
        ch = {"data": {which: str(p)}}
        if template:
            ch["model"] = {"path": str(_template_model(ws, fx))}
        c = train(ws, fx, _own_cache(ws, deep_update(ch, changes or {})))
        if check:
            c.checks = (_not_tokenised,)
        return c

    return build


for _id, _title, _build, _names in [
    (
        "chat-no-template",
        "chat records with a tokenizer that has no chat template (a traceback)",
        _chat([CHAT]),
        (r"train\.jsonl", MODEL, r"(?i)chat template"),
    ),
    (
        "chat-eval-no-template",
        "chat records in the eval file only, tokenizer without a chat template",
        _chat([CHAT], which="eval"),
        (r"eval\.jsonl", MODEL, r"(?i)chat template"),
    ),
    (
        "chat-format-forced-no-template",
        "data.format: chat, tokenizer without a chat template",
        _chat([CHAT], changes={"data": {"format": "chat"}}),
        (r"train\.jsonl", MODEL, r"(?i)chat template"),
    ),
    (
        "chat-template-flag-no-template",
        "data.chat_template: true on prompt/completion records, tokenizer without a chat template",
        _chat(
            [{"prompt": "Reverse: red cat\nAnswer:", "completion": " cat red"}],
            changes={"data": {"chat_template": True}},
        ),
        (r"train\.jsonl", MODEL, r"chat_template"),
    ),
    (
        "chat-template-rejects-system",
        "a chat record with a system turn, template that refuses system",
        _chat([CHAT, SYSTEM], template=True, check=False),
        (r"train\.jsonl:2", MODEL, r"system"),
    ),
    (
        "chat-template-rejects-tool",
        "a chat record with a tool turn the template does not know",
        _chat([TOOL], template=True, check=False),
        (r"train\.jsonl:1", MODEL, r"tool"),
    ),
    (
        "chat-template-rejects-order",
        "a chat record that starts with the assistant, template wants user first",
        _chat([ASSISTANT_FIRST], template=True, check=False),
        (r"train\.jsonl:1", MODEL, r"(?i)user"),
    ),
]:
    case(f"upfront-{_id}", UP, _title, err(*_names), defect="chat-template")(_build)


@case(
    "upfront-chat-template-ok",
    UP,
    "chat records with a tokenizer whose template accepts them (trains)",
    ok(),
    defect="chat-template",
)
def _(ws, fx):
    return _chat([CHAT], template=True, check=False, changes={"train": {"max_steps": 1}})(ws, fx)


@case(
    "upfront-evaluate-chat-no-template",
    UP,
    "evaluate: chat records on a model without a chat template",
    err(r"chat\.jsonl", MODEL, r"(?i)chat template"),
    defect="chat-template",
)
def _(ws, fx):
    from tests.faults.cases import evaluate

    p = write_jsonl(Path(ws) / "chat.jsonl", [CHAT] * 4)
    return evaluate(ws, fx, data=p)
