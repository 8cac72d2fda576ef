"""Checkpoints and exact resume on real 2-rank ZeRO-3 runs (tiny model, CPU)."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from gpart_ds.methods.gpart.adapter import load_adapter
from tests.helpers import REPO, deepspeed_launcher, free_port, rank_env, run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
BASE = [
    f"train.max_steps={STEPS}",
    "train.micro_batch_size=4",
    "train.eval_examples=8",
    "train.log_every=100",
    "train.lr=0.02",
    "method.dropout=0.1",
    "checkpoint.every_steps=3",
]


def train(n, out, *extra, check=True):
    return run_ranks(
        n, "launch/train.py", "--config", "configs/tiny.yaml", f"output_dir={out}", *BASE, *extra, check=check
    )


def losses(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "step" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_assets):
    """6 uninterrupted steps on 2 ranks, with dropout (so the RNG state must resume too)."""
    out = tmp_path_factory.mktemp("straight")
    train(2, out, "train.grad_accum=1")
    return out


@pytest.fixture(scope="module")
def straight_no_dropout(tmp_path_factory, tiny_assets):
    """Dropout draws one mask per micro-batch, so 1 rank x accum 2 only matches without it."""
    out = tmp_path_factory.mktemp("straight_nodrop")
    train(2, out, "train.grad_accum=1", "method.dropout=0")
    return out


def _resume_from_step3(straight, out, n, accum, *extra):
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000003", out / "checkpoints" / "step-000003")
    train(n, out, f"train.grad_accum={accum}", "train.resume=auto", *extra)


def test_checkpoints_hold_no_frozen_weights_and_keep_last(straight):
    ckpts = sorted(p.name for p in (straight / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-000003", "step-000006"]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step-000006"
    size = sum(f.stat().st_size for f in (straight / "checkpoints" / "step-000006").iterdir())
    assert size < 200_000, f"{size} bytes: frozen weights leaked into the checkpoint?"
    manifest = json.loads((straight / "checkpoints" / "step-000006" / "manifest.json").read_text())
    assert {
        "state.safetensors",
        "state.json",
        "run_config.yaml",
        "rng-rank0.safetensors",
        "rng-rank1.safetensors",
    } <= set(manifest["files"])


def test_resume_is_bit_identical_to_an_uninterrupted_run(straight, tmp_path):
    out = tmp_path / "resumed"
    _resume_from_step3(straight, out, 2, 1)
    a, b = load_adapter(straight / "adapter")[0], load_adapter(out / "adapter")[0]
    assert torch.equal(a, b)
    la, lb = losses(straight), losses(out)
    assert sorted(lb) == [4, 5, 6] and all(la[s] == lb[s] for s in lb)


def test_resume_on_one_rank_with_the_same_global_batch(straight_no_dropout, tmp_path):
    out = tmp_path / "one"
    _resume_from_step3(straight_no_dropout, out, 1, 2, "method.dropout=0")
    a, b = load_adapter(straight_no_dropout / "adapter")[0], load_adapter(out / "adapter")[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resume_at_a_new_lr_continues_the_schedule_at_it_and_says_so_once(straight, tmp_path):
    out = tmp_path / "new_lr"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000003", out / "checkpoints" / "step-000003")
    proc = train(2, out, "train.grad_accum=1", "train.resume=auto", "train.lr=0.01")
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "the checkpoint was trained at" in line]
    assert len(said) == 1 and "train.lr is 0.01, the checkpoint was trained at 0.02" in said[0], said

    def lrs(run):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in recs if "lr" in r and "step" in r}

    old, new = lrs(straight), lrs(out)
    assert sorted(new) == [4, 5, 6]
    assert all(new[s] == pytest.approx(old[s] / 2, rel=1e-12) for s in new), (old, new)


def _wait_for_step(out, step, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if (out / "metrics.jsonl").exists() and any(s >= step for s in losses(out)):
            return True
        time.sleep(0.2)
    return False


def _start(out, *extra):
    env = rank_env()
    cmd = [
        deepspeed_launcher(),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "launch/train.py",
        "--config",
        "configs/tiny.yaml",
        f"output_dir={out}",
        *BASE,
        "train.max_steps=16",
        "checkpoint.every_steps=2",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rank_pids(out):
    ps = subprocess.run(
        ["pgrep", "-f", f"launch/train.py --local_rank=.* output_dir={out}"], capture_output=True, text=True
    ).stdout.split()
    return [int(p) for p in ps]


def test_sigterm_checkpoints_exits_75_and_resume_finishes_like_a_straight_run(tmp_path, tiny_assets):
    out = tmp_path / "preempted"
    proc = _start(out)
    assert _wait_for_step(out, 3, proc), proc.communicate()[0][-3000:]
    for pid in _rank_pids(out):  # SLURM signals every task of the step
        os.kill(pid, signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, log[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stop = [r for r in recs if r.get("event") == "preempted"]
    assert len(stop) == 1 and (out / "checkpoints" / f"step-{stop[0]['step']:06d}" / "manifest.json").is_file()

    resumed = run_ranks(
        2,
        "launch/train.py",
        "--config",
        "configs/tiny.yaml",
        f"output_dir={out}",
        *BASE,
        "train.max_steps=16",
        "checkpoint.every_steps=2",
        "train.resume=auto",
    )
    assert resumed.returncode == 0
    straight = tmp_path / "straight16"
    run_ranks(
        2,
        "launch/train.py",
        "--config",
        "configs/tiny.yaml",
        f"output_dir={straight}",
        *BASE,
        "train.max_steps=16",
        "checkpoint.every_steps=2",
    )
    assert torch.equal(load_adapter(out / "adapter")[0], load_adapter(straight / "adapter")[0])


def test_killed_rank_ends_the_job_quickly_and_resume_recovers(tmp_path, tiny_assets):
    out = tmp_path / "killed"
    proc = _start(out, "dist.timeout_minutes=1")
    assert _wait_for_step(out, 3, proc), proc.communicate()[0][-3000:]
    t0 = time.time()
    os.kill(max(_rank_pids(out)), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 90
    run_ranks(
        2,
        "launch/train.py",
        "--config",
        "configs/tiny.yaml",
        f"output_dir={out}",
        *BASE,
        "train.max_steps=16",
        "checkpoint.every_steps=2",
        "train.resume=auto",
    )
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["step"] >= 2 for r in recs)


def test_drifted_config_is_refused_naming_the_key(straight, tmp_path):
    out = tmp_path / "drift"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000003", out / "checkpoints" / "step-000003")
    proc = train(2, out, "train.resume=auto", "method.seed=7", check=False)
    assert proc.returncode == 2
    assert "method.seed" in proc.stderr and "trained with method.seed=0" in proc.stderr


def test_without_an_evaluation_before_training_a_resume_never_makes_one(tmp_path, tiny_assets):
    """train.eval_before=false: no step-0 evaluation, the summary's *_before null (not
    missing, not 0), the checkpoint stores before: null, and a resume (even with the
    default eval_before=true) evaluates nothing at step 0: it would score the trained
    model as the base. (With eval_before=true the resumes keep the first run's `before`:
    the stop-mid-evaluation test below.)"""
    out = tmp_path / "run"
    common = ["train.grad_accum=1", "train.eval_predictions=true", "checkpoint.every_steps=3"]
    first = ["train.max_steps=3", "train.eval_before=false"]
    run_ranks(1, "launch/train.py", "--config", "configs/tiny.yaml", f"output_dir={out}", *BASE, *common, *first)
    proc = run_ranks(
        1,
        "launch/train.py",
        "--config",
        "configs/tiny.yaml",
        f"output_dir={out}",
        *BASE,
        *common,
        "train.max_steps=6",
        "train.resume=auto",
    )
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
    assert len(starts) == 2
    runs = recs[: starts[1]], recs[starts[1] :]
    evals = [[r["step"] for r in run if r.get("event") == "eval"] for run in runs]
    summaries = [next(r for r in run if r.get("event") == "summary") for run in runs]
    fields = ("eval_loss_before", "answer_accuracy_before", "accuracy_before", "exact_match_before")
    stored = json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())["before"]
    assert evals == [[3], [6]]  # the resume: no step-0 evaluation
    assert not (out / "predictions" / "step-000000.jsonl").exists()
    assert stored is None
    for s in summaries:
        assert all(k in s and s[k] is None for k in fields), s
    assert "before training: not evaluated (resumed at step 3" in proc.stdout + proc.stderr


def _events(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return recs, [(r["event"], r["step"]) for r in recs if r.get("event") in ("eval", "preempted")]


def test_a_stop_signal_mid_evaluation_exits_75_at_once_and_the_resumes_lose_nothing(straight, tmp_path):
    """A stop signal during an evaluation gives it up within one batch and exits 75: before
    training nothing is kept; during training the step's checkpoint records the evaluation as
    due and the resume runs it first (a stop during that one keeps it due); after the last
    step the resume writes the outputs from its checkpoint. Only rank 0 is signalled: rank 1
    learns of it through the collective. An evaluation with generated answers on a large
    model takes minutes, more than SLURM waits between its signal and the kill."""
    out = tmp_path / "run"
    run = [*BASE, "train.grad_accum=1", "train.eval_every=3", "train.eval_generate=always", "train.resume=auto"]
    run += ["train.eval_predictions=true"]
    codes = []
    # before training; during; during the evaluation that resume owes; after the last step; none
    for stop_at in (0, 3, 3, STEPS, None):
        script = "tests/integration/stop_in_eval_worker.py" if stop_at is not None else "launch/train.py"
        env = {"STOP_AT_EVAL": str(stop_at)} if stop_at is not None else None
        proc = run_ranks(2, script, "--config", "configs/tiny.yaml", f"output_dir={out}", *run, env=env, check=False)
        assert proc.returncode in (0, 75), proc.stdout[-3000:] + proc.stderr[-3000:]
        codes.append(proc.returncode)
    assert codes == [75, 75, 75, 75, 0]
    recs, events = _events(out)
    # every evaluation given up was run by the next attempt; none was written half-done
    assert events == [
        ("preempted", 0),
        ("eval", 0),
        ("preempted", 3),
        ("preempted", 3),  # the owed evaluation given up too: the step-3 checkpoint still owes it
        ("eval", 3),
        ("preempted", 6),
        ("eval", 6),
    ]
    state = json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["eval_due"] is True
    # the evaluation before training is the first attempt that finished it: the checkpoints
    # keep it and no resume makes another (it would score the trained model as the base)
    summary = [r for r in recs if r.get("event") == "summary"]
    step0 = next(r for r in recs if r.get("event") == "eval" and r["step"] == 0)
    assert len(summary) == 1 and summary[0]["answer_accuracy_before"] is not None
    assert state["before"]["eval_loss"] == step0["eval_loss"] == summary[0]["eval_loss_before"] > 0
    assert (out / "predictions" / "step-000000.jsonl").is_file()
    # the same trained state and scores as the run never stopped (evaluating changes no training)
    assert torch.equal(load_adapter(out / "adapter")[0], load_adapter(straight / "adapter")[0])
    plain, _ = _events(straight)
    for step in (0, STEPS):
        a, b = (next(r for r in rs if r.get("event") == "eval" and r["step"] == step) for rs in (recs, plain))
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6), step
