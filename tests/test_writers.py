"""One writer per output folder: the lock file (gpart_ds/ownership.py), temporary
names unique per writer, concurrent exports refused, a second run into a live run's folder
refused, and a stop signal during start-up ending in 75 (what slurm/gpart.sh requeues)."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gpart_ds.export import folder
from gpart_ds.ownership import LOCK_NAME, FolderBusy, FolderLock, FolderUnwritable, peek
from tests.helpers import REPO, rank_env

HOLD = (
    "import sys, time; sys.path.insert(0, {repo!r}); from gpart_ds.ownership import FolderLock; "
    "FolderLock.{how}({path!r}, 'output_dir').acquire(); print('held', flush=True); time.sleep(120)"
)


def _holder(path, how="for_folder"):
    """Another process that holds the lock of `path` (as a live run does) until killed."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(repo=str(REPO), path=str(path), how=how)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


def _write_lock(folder, **holder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"since": "2026-01-01T00:00:00", **holder}))


def test_a_live_holder_in_another_process_is_refused_by_name_then_released_by_its_death(tmp_path, caplog):
    run = tmp_path / "run"
    p = _holder(run)
    try:
        with pytest.raises(FolderBusy, match=rf"pid {p.pid} on host {socket.gethostname()}.*since"):
            FolderLock.for_folder(run, "output_dir").acquire()
        with pytest.raises(FolderBusy, match=str(p.pid)):  # a look, without taking it
            peek(run / LOCK_NAME, "output_dir", "output_dir")
    finally:
        p.kill()
        p.wait()
    # kill -9 cannot remove the file, but the kernel released the flock: stale, taken over
    with caplog.at_level(logging.WARNING, logger="gpart_ds"):
        lock = FolderLock.for_folder(run, "output_dir").acquire()
    assert lock.took_over["pid"] == p.pid and f"pid {p.pid}" in caplog.text and "stale" in caplog.text
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_a_lock_of_a_dead_pid_on_this_host_is_stale(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path / "run", host=socket.gethostname(), pid=dead.pid)
    peek(tmp_path / "run" / LOCK_NAME, "output_dir", "output_dir")  # nothing to refuse
    with caplog.at_level(logging.WARNING, logger="gpart_ds"):
        with FolderLock.for_folder(tmp_path / "run", "output_dir") as lock:
            assert lock.took_over["pid"] == dead.pid
    assert "is gone" in caplog.text and not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_refused_naming_it_and_how_to_remove_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _write_lock(tmp_path / "run", host="gpu-node-7", pid=4242)
    for attempt in (
        lambda: FolderLock.for_folder(tmp_path / "run", "output_dir").acquire(),
        lambda: peek(tmp_path / "run" / LOCK_NAME, "output_dir 'run'", "output_dir"),
    ):
        with pytest.raises(FolderBusy, match=r"gpu-node-7.*remove .*\.gpart\.lock"):
            attempt()
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["host"] == "gpu-node-7"  # untouched


def test_the_same_slurm_job_requeued_takes_its_own_lock_over(tmp_path, monkeypatch, caplog):
    _write_lock(tmp_path / "run", host="gpu-node-7", pid=4242, slurm_job="991", slurm_restart="0")
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same allocation: two steps at once
    with pytest.raises(FolderBusy, match="gpu-node-7"):
        FolderLock.for_folder(tmp_path / "run", "output_dir").acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the earlier allocation is gone
    with caplog.at_level(logging.WARNING, logger="gpart_ds"):
        lock = FolderLock.for_folder(tmp_path / "run", "output_dir").acquire()
    assert "requeued" in caplog.text and lock.took_over["slurm_job"] == "991"
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "992")  # another job's lock stays refused
    _write_lock(tmp_path / "run", host="gpu-node-7", pid=4242, slurm_job="991", slurm_restart="0")
    with pytest.raises(FolderBusy):
        FolderLock.for_folder(tmp_path / "run", "output_dir").acquire()


def test_a_lock_nests_in_one_process_and_a_refused_start_leaves_no_folder(tmp_path):
    outer = FolderLock.beside(tmp_path / "a" / "merged", "--out").acquire()
    inner = FolderLock.beside(tmp_path / "a" / "merged", "--out").acquire()  # the run's export, nested
    inner.release()
    assert (tmp_path / "a" / ".merged.gpart.lock").exists()
    outer.release()
    assert not (tmp_path / "a").exists()  # made to hold the lock, empty: removed
    p = _holder(tmp_path / "held", how="for_folder")
    try:
        with pytest.raises(FolderBusy):
            FolderLock.for_folder(tmp_path / "held", "output_dir").acquire()
        assert (tmp_path / "held" / LOCK_NAME).exists()  # the holder's file is untouched
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("how, key", [("for_folder", "output_dir"), ("beside", "export.dir")])
def test_an_output_that_cannot_be_created_is_refused_naming_its_key(tmp_path, how, key):
    # /proc takes no new entries, even from root (whom no permission bit stops): the
    # environment's error, said as which output and what to change, before anything runs
    with pytest.raises(
        FolderUnwritable, match=rf"^{key} '/proc/gpart_x' cannot be created: .*no such file.*choose another {key}$"
    ):
        getattr(FolderLock, how)("/proc/gpart_x", key).acquire()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        FolderUnwritable, match=f"{key} '{blocker}/out' cannot be created: .*a path component is a file"
    ):
        getattr(FolderLock, how)(blocker / "out", key).acquire()


def test_export_temporaries_are_unique_per_writer_and_stale_ones_named(tmp_path, caplog):
    out = tmp_path / "merged"
    names = {folder.temp_dir_for(out).name for _ in range(20)}
    assert len(names) == 20 and all(n.startswith(".merged.tmp-export-") for n in names)
    from tests.faults.runner import TEMP_NAME

    assert all(TEMP_NAME.search(n + "/") for n in names)
    dead = tmp_path / ".merged.tmp-export-host-1-abc"
    legacy = tmp_path / ".merged.tmp-export"
    dead.mkdir()
    legacy.mkdir()
    (tmp_path / ".other.tmp-export-x").mkdir()  # another output's: not ours to remove
    with caplog.at_level(logging.WARNING, logger="gpart_ds"), folder.output_lock(out):
        tmp = folder.start_output(out)
    assert tmp.is_dir() and not dead.exists() and not legacy.exists() and (tmp_path / ".other.tmp-export-x").exists()
    assert str(dead) in caplog.text


def _tiny_adapter_and_base(tmp_path, tiny_assets):
    import torch
    from transformers import AutoModelForCausalLM

    from gpart_ds.methods.gpart.adapter import adapter_config, save_adapter
    from gpart_ds.targets import build_layout

    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    layout = build_layout(model, "all-linear")
    cfg = adapter_config(
        d=64, seed=0, target_modules="all-linear", dropout=0.0, layout=layout, base_model={"name": "tiny"}
    )
    save_adapter(tmp_path / "adapter", torch.full((64,), 1e-3), cfg)
    return tiny_assets / "model", tmp_path / "adapter"


def _export_cmd(base, adapter, out, *extra):
    return [
        sys.executable,
        "-m",
        "gpart_ds.export",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--out",
        str(out),
        *extra,
    ]


def test_a_second_export_to_one_out_is_refused_while_the_first_runs(tmp_path, tiny_assets):
    base, adapter = _tiny_adapter_and_base(tmp_path, tiny_assets)
    out = tmp_path / "merged"
    # the first export, slowed down (tiny blocks) and stopped once it writes its temporary folder
    first = subprocess.Popen(
        _export_cmd(base, adapter, out, "--block-mb", "0.0005"),
        cwd=REPO,
        env=rank_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not folder.stale_temps(out) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first export ended before it could be caught writing"
        second = subprocess.run(
            _export_cmd(base, adapter, out, "--overwrite"),
            cwd=REPO,
            env=rank_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert len(folder.stale_temps(out)) == 1  # the first one's folder is untouched
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert not folder.stale_temps(out) and not (tmp_path / ".merged.gpart.lock").exists()
    assert json.loads((out / "gpart_merge.json").read_text())


def _config(tmp_path, **train):
    from tests.faults.fixtures import base_config

    cfg = base_config(tmp_path / "run", tmp_path / "tokcache")
    cfg["train"].update(train)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _train(cfg, *overrides, **kw):
    return subprocess.Popen(
        [sys.executable, "launch/train.py", "--config", str(cfg), *overrides],
        cwd=REPO,
        env=rank_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_a_second_training_into_a_live_runs_folder_is_refused_naming_it(tmp_path, tiny_assets):
    cfg = _config(tmp_path, max_steps=400, log_every=50)
    first = _train(cfg)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while (
            first.poll() is None
            and time.monotonic() < deadline
            and not (metrics.is_file() and '"step": 1,' in metrics.read_text())
        ):
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)  # a live run, frozen: it writes nothing meanwhile
        assert first.poll() is None, first.communicate()[1][-3000:]
        for extra in ([], ["train.resume=auto"]):
            second = _train(cfg, *extra)
            _, err = second.communicate(timeout=600)
            assert second.returncode == 2, err[-3000:]
            assert "error:" in err and f"pid {first.pid}" in err and "Traceback" not in err, err[-3000:]
    finally:
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 75, err[-3000:]  # the first run was never disturbed: it checkpoints
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_sigterm_during_start_up_ends_with_75_and_one_line(tmp_path, tiny_assets):
    cfg = _config(tmp_path, max_steps=2)
    proc = _train(cfg)
    # While it imports torch (its libraries are mapped): start-up, well before training. (Before
    # the interpreter runs any code at all, nothing can catch a signal.)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            # (after the exec: the forked child still shows this test process's libraries)
            if (
                b"train.py" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
                and "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
            ):
                break
        except OSError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("stopped: ")]
    assert len(line) == 1 and "SIGTERM" in line[0] and "train.resume=auto" in line[0]
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_stop_signal_while_the_lock_is_being_taken_leaves_no_lock_file(tmp_path, monkeypatch):
    """SIGTERM during start-up raises (launch/train.py); arriving between creating the lock
    file and owning it, it once left `.gpart.lock` and the folder behind (a stopped start must
    leave nothing). The exception waits until the lock is taken, then the caller's release
    removes both."""
    from gpart_ds import ownership

    class Stop(Exception):
        pass

    def handler(signum, frame):  # as launch/train.py's start-up handler does
        exc = Stop()
        if ownership.defer_stop(exc):
            return
        raise exc

    real = ownership.read_holder

    def read_and_signal(path):  # inside acquire: the file exists, the lock is not ours yet
        os.kill(os.getpid(), signal.SIGTERM)
        return real(path)

    monkeypatch.setattr(ownership, "read_holder", read_and_signal)
    old = signal.signal(signal.SIGTERM, handler)
    lock = FolderLock.for_folder(tmp_path / "run", "output_dir")
    try:
        with pytest.raises(Stop):
            try:
                lock.acquire()
            finally:
                lock.release()  # what the trainer does on the way out
    finally:
        signal.signal(signal.SIGTERM, old)
    assert not (tmp_path / "run").exists(), list((tmp_path / "run").iterdir())
