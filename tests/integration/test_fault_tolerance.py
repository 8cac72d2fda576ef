"""A node dies, the job trains on (dist.fault_tolerance: nodes; docs/fault_tolerance.md).

One scenario, the hardest node to lose: three simulated nodes x 2 CPU ranks, each node its own
world, a torchft lighthouse (launch/sim_nodes.py --ft), a checkpoint every 10 steps. Node 0 is
the writer (the quorum's first participant); it is killed (kill -9, every process) while it
writes checkpoint 10: gpart_ds/checkpoint.py's test-only hook (GPART_TEST_CKPT_PAUSE) holds it
between the complete temporary folder and the rename, and the launcher kills the node once that
temporary's manifest exists. Node 0 is started again once the others logged step 14. What must
hold:

- nodes 1 and 2 train on without a restart: every step 1..STEPS committed exactly once (the one
  in flight at the kill may fail to commit and is run again, said in metrics.jsonl), the loss
  finite throughout, the quorum shrinks to [1, 2] right after the kill;
- node 1 takes over the writing; the half-published temporary is never listed nor read, and
  is removed once a newer checkpoint is published;
- node 0 resumes the newest published checkpoint, rejoins a quorum [0, 1, 2] in which it healed
  from a live node, and from that step on its theta and Adam moments (digests over every rank's
  partition) equal the others' bit for bit;
- every node exits 0; one node wrote the final adapter and export, and the merged export equals
  the offline merge of the adapter (python -m gpart_ds.export) byte for byte; a plain run
  resumes the fault-tolerant run's checkpoint.
"""

import json
import shutil
import subprocess
import sys

import pytest

from tests.export_helpers import raw_bytes, read_folder
from tests.helpers import REPO, rank_env, run_ranks

sys.path.insert(0, str(REPO / "launch"))
import sim_nodes  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NODES, PER_NODE, KILL, CKPT, RESTART_AT = 3, 2, 0, 10, 14
# Long enough for the restarted node's start-up (~40 s on 2 loaded cores) while the others
# step at ~0.3 s.
STEPS = 300


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_assets):
    root = tmp_path_factory.mktemp("ft")
    out = root / "run"
    temp = out / "checkpoints" / f".step-{CKPT:06d}.tmp"
    said = []
    res = sim_nodes.run_ft(
        NODES,
        PER_NODE,
        "configs/tiny.yaml",
        [
            f"train.max_steps={STEPS}",
            "train.log_every=50",
            "train.eval_examples=8",
            f"checkpoint.every_steps={CKPT}",
            "checkpoint.keep_last=2",
            "export.merged=true",
            f"output_dir={out}",
        ],
        timeout=900,
        env={**rank_env(), "GPART_TEST_CKPT_PAUSE": f"{CKPT}:60"},
        kill_node=KILL,
        kill_when=lambda: (temp / "manifest.json").is_file(),
        restart_at=RESTART_AT,
        say=lambda *a, **k: said.append(" ".join(map(str, a))),
    )
    if any(res["codes"].values()) or res["restarted_at"] is None:
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(root.glob("run.node*.log")))
        raise AssertionError(f"fault-tolerant run failed: {res} {said}\n{logs}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, res, recs


def _steps(recs, replica):
    return [r for r in recs if r.get("replica") == replica and "loss" in r and "event" not in r]


def test_the_survivors_train_on_without_a_repeated_step(run):
    out, res, recs = run
    # the kill landed inside the write: node 0 had logged the pause, step 10's temporary was
    # complete, and the survivors had committed step 10 and nothing after it
    first_log = (out.parent / "run.node0.log").read_text()
    assert f"pausing 60 s before publishing checkpoint step {CKPT}" in first_log
    assert res["killed_at"][1] == CKPT and res["restarted_at"][1] >= RESTART_AT, res
    for k in (1, 2):
        steps = _steps(recs, k)
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
        assert all(r["committed"] and r["loss"] == r["loss"] and abs(r["loss"]) < 100 for r in steps)
        # the step in flight when node 0 died may fail to commit anywhere: it is run again (not
        # applied twice); no other step is
        retried = [r["step"] for r in recs if r.get("event") == "retry" and r["replica"] == k]
        assert len(retried) <= 1 and all(CKPT < s <= RESTART_AT + 1 for s in retried), retried
    shrink = [r for r in recs if r.get("event") == "quorum" and r["replicas"] == [1, 2]]
    assert {r["replica"] for r in shrink} == {1, 2}
    assert all(r["step"] in (CKPT + 1, CKPT + 2) for r in shrink), shrink
    after = [r for r in _steps(recs, 1) if r["step"] == shrink[0]["step"]][0]
    assert after["replicas"] == [1, 2] and after["quorum_s"] < 30


def test_the_half_published_checkpoint_is_never_taken(run):
    from gpart_ds import checkpoint

    out, res, recs = run
    ckpts = out / "checkpoints"
    # the killed writer's temporary is never listed nor read, and the writer that took over
    # removed it once it had published a newer checkpoint
    assert not (ckpts / f".step-{CKPT:06d}.tmp").exists()
    logs = "".join((out.parent / f"run.node{k}.log").read_text() for k in (1, 2))
    assert f"removed 1 temporary folder(s) a stopped writer left: .step-{CKPT:06d}.tmp" in logs
    listed = checkpoint.list_checkpoints(ckpts)
    assert [p.name for p in listed] == [f"step-{STEPS:06d}", f"step-{STEPS - CKPT:06d}"]
    for p in listed:
        checkpoint.verify(p)
    assert (ckpts / "latest").read_text().strip() == f"step-{STEPS:06d}"
    resumed = [r["step"] for r in recs if r.get("event") == "resume" and r.get("replica") == KILL]
    assert len(resumed) == 1 and resumed[0] > CKPT and resumed[0] % CKPT == 0, resumed


def test_the_restarted_writer_heals_and_equals_the_others_bit_for_bit(run):
    out, res, recs = run
    rejoin = [r for r in recs if r.get("event") == "quorum" and r["replica"] == KILL and r["healed"]]
    assert len(rejoin) == 1 and rejoin[0]["step"] > RESTART_AT, rejoin
    first = rejoin[0]["step"]
    assert rejoin[0]["replicas"] == [0, 1, 2]
    later = [r["step"] for r in _steps(recs, KILL) if r["step"] >= first]
    assert later == list(range(first, STEPS + 1))  # it joined at the others' step and kept it
    by_step = {}
    for r in recs:
        if "theta_sha" in r:
            by_step.setdefault(r["step"], {})[r["replica"]] = (r["theta_sha"], r["adam_sha"])
    for step in range(first, STEPS + 1):
        assert len(by_step[step]) == 3 and len(set(by_step[step].values())) == 1, (step, by_step[step])
    for step in range(1, STEPS + 1):  # and the two survivors at every step
        assert by_step[step][1] == by_step[step][2], step


def test_one_writer_and_the_export_equals_the_offline_merge_of_the_adapter(run, tmp_path):
    out, res, recs = run
    summaries = [r for r in recs if r.get("event") == "summary"]
    assert sorted(r["replica"] for r in summaries) == [0, 1, 2]
    assert sum(bool(r["writer"]) for r in summaries) == 1
    _assert_export_is_the_offline_merge(out, tmp_path)


def test_a_plain_run_resumes_the_fault_tolerant_runs_checkpoint(run, tmp_path):
    """Checkpoints keep their format: a run without fault tolerance (one world of 2 ranks)
    continues the fault-tolerant run from its last checkpoint."""
    out, res, recs = run
    plain = tmp_path / "plain"
    shutil.copytree(out / "checkpoints", plain / "checkpoints")
    run_ranks(
        2,
        "launch/train.py",
        "--config",
        "configs/tiny.yaml",
        f"output_dir={plain}",
        "train.resume=auto",
        f"train.max_steps={STEPS + 2}",
        "train.eval_examples=8",
        "train.eval_generate=never",
        timeout=600,
    )
    again = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again if r.get("event") == "resume"] == [STEPS]
    assert [r["step"] for r in again if "loss" in r and "event" not in r] == [STEPS + 1, STEPS + 2]


def _assert_export_is_the_offline_merge(out, tmp_path):
    """The run's merged folder equals `gpart_ds.export` of its adapter, byte for byte."""
    offline = tmp_path / "offline"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "gpart_ds.export",
            "--base",
            str(REPO / ".cache/tiny/model"),
            "--adapter",
            str(out / "adapter"),
            "--out",
            str(offline),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        env=rank_env(),
    )
    merged, ref = read_folder(out / "merged"), read_folder(offline)
    assert merged.keys() == ref.keys() and len(merged) > 10
    assert all(raw_bytes(merged[k]) == raw_bytes(ref[k]) for k in merged)
