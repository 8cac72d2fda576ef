"""The user-facing entry point: `deepspeed launch/train.py --config ...` end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import CHOICES_EVAL, REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_deepspeed_launch_tiny_config_trains_and_writes_adapter_and_metrics(deepspeed_tiny_run):
    out, proc = deepspeed_tiny_run  # 12 steps, shared with the sbatch and mpirun tests
    assert "step 12/12" in proc.stdout + proc.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "run_config.yaml").is_file()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "step" in r and "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for r in steps:
        assert r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_gb"] > 0
    summary = recs[-1]
    assert summary["event"] == "summary" and summary["world"] == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    # Each evaluation's verdicts, gathered from both ranks, in record order: the last in
    # eval_predictions.jsonl, the earlier ones (train.eval_predictions) in predictions/
    evals = {r["step"]: r for r in recs if r.get("event") == "eval"}
    assert sorted(evals) == [0, 12] and [p.name for p in (out / "predictions").iterdir()] == ["step-000000.jsonl"]
    for step, ev in evals.items():
        f = out / ("eval_predictions.jsonl" if step == 12 else f"predictions/step-{step:06d}.jsonl")
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        assert [r["index"] for r in rows] == list(range(8))  # train.eval_examples=8
        assert rows[0]["record"].endswith(f"{CHOICES_EVAL}:1") and rows[7]["record"].endswith(f"{CHOICES_EVAL}:8")
        assert sum(r["match"] for r in rows) / 8 == ev["exact_match"]
    # The generated answers of both ranks' shares (ZeRO-3, synced decoding) before and after
    assert summary["answer_accuracy_before"] is not None and summary["answer_accuracy_after"] is not None
    rows = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert all("generated" in r and "answer_correct" in r for r in rows)
    assert sum(r["answer_correct"] for r in rows) / 8 == evals[12]["answer_accuracy"]
    # what each evaluation cost, the generated answers' share of it apart
    assert all(0 < ev["generate_s"] < ev["eval_s"] for ev in evals.values())
    # no partial folders left behind by the atomic write
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    # nor DeepSpeed's CPU all-reduce buffers in /dev/shm (69 MB per rank per run)
    port = proc.args[proc.args.index("--master_port") + 1]
    from pathlib import Path

    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_metrics_reach_tensorboard_and_wandb_and_the_progress_line_shows_an_eta(deepspeed_tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, proc = deepspeed_tiny_run  # log.wandb=true, log.wandb_mode=offline; TensorBoard: auto
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in recs if "step_time_s" in r}
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb.keys() == losses.keys() and all(abs(tb[s] - losses[s]) < 1e-6 * abs(losses[s]) for s in tb)
    evals = [r for r in recs if r.get("event") == "eval"]
    assert [e.step for e in acc.Scalars("eval/eval_loss")] == [r["step"] for r in evals]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    assert b"train/loss" in blob and b"eval/eval_loss" in blob and b"eval_loss_after" in blob
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "step 4/12" in ln or "step 12/12" in ln]
    assert any("ETA " in ln for ln in lines), lines


def _train_py(*args):
    return subprocess.run(
        [sys.executable, "launch/train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_bad_config_fails_fast_with_exit_code_2_and_names_the_key(tmp_path, tiny_assets):
    proc = _train_py("--config", "tiny", "method.d=0", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "command-line override 'method.d'" in proc.stderr and "d must be >= 1" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_bad_data_names_file_and_line(tmp_path, tiny_assets):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    proc = _train_py("--config", "tiny", f"data.train={bad}", f"output_dir={tmp_path / 'o'}")
    assert proc.returncode == 2
    assert f"{bad}:2: missing key 'completion'" in proc.stderr


def test_answers_generated_in_training_equal_the_evaluators_on_its_adapter(deepspeed_tiny_run, tiny_assets):
    """Two ZeRO-3 ranks decoding their shares of the records (every forward gathers the
    sharded weights, synced until both ranks are done) say what one process says with the
    saved adapter on the plain model, record for record; and so do their choice scores (2 or
    3 multi-token choices a record, each prompt's KV cache shared by its choices)."""
    from gpart_ds import evaluate

    out, _ = deepspeed_tiny_run
    trained = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    alone = []
    evaluate.evaluate_files(
        str(tiny_assets / "model"),
        str(out.parent / CHOICES_EVAL),
        adapter=str(out / "adapter"),
        max_length=64,
        max_examples=8,
        predictions=alone,
    )
    assert [r["generated"] for r in trained] == [r["generated"] for r in alone]
    assert {len(r["scores"]) for r in trained} == {2, 3}
    assert [r["predicted"] for r in trained] == [r["predicted"] for r in alone]
    flat = lambda rows: torch.tensor([x for r in rows for x in r["scores"]], dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(flat(trained), flat(alone), rtol=1e-4, atol=1e-4)


def test_the_quickstart_refuses_a_bad_override_once_before_launching(tmp_path):
    """The quickstart checks its config and overrides once (gpart_ds.preflight) before the
    deepspeed launcher starts a rank: one `error:` line and exit 2, no launcher output."""
    proc = subprocess.run(
        ["bash", "launch/quickstart.sh", "train.max_steps=abc", f"output_dir={tmp_path / 'qs'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NPROC": "2"},
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert text.count("error: command-line override 'train.max_steps'") == 1, text[-3000:]
    assert "launch.py" not in text and not (tmp_path / "qs").exists(), text[-3000:]
