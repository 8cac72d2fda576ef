"""A node dies, the job trains on (dist.fault_tolerance: nodes; docs/fault_tolerance.md).

Three simulated nodes x 2 CPU ranks, each node its own world, and a torchft lighthouse
(launch/sim_nodes.py --ft). kill -9 of every process of node 2 once the others logged step 5;
node 2 started again at step 8. What must hold:

- nodes 0 and 1 train on without a restart: every step 1..STEPS committed exactly once (no step
  repeated or skipped; the one in flight at the kill may fail to commit and is run again, said in
  metrics.jsonl), the loss finite throughout, the quorum shrinks to [0, 1] right after the kill;
- node 2 rejoins: a quorum [0, 1, 2] in which it healed from a live node, and from that step on
  its theta and Adam moments (digests over every rank's partition) equal the others' bit for bit;
- every node exits 0; one node wrote the checkpoints, the adapter and the export, and the merged
  export equals the offline merge of the adapter (python -m gpart_ds.export) byte for byte.
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

NODES, PER_NODE, KILL, KILL_AT, RESTART_AT = 3, 2, 2, 5, 8
# Long enough for the restarted node's start-up (~40 s on 2 loaded cores) while the others
# step at ~0.3 s.
STEPS = 300
OVERRIDES = [
    f"train.max_steps={STEPS}",
    "train.log_every=50",
    "train.eval_examples=8",
    "checkpoint.every_steps=50",
    "export.merged=true",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_assets):
    root = tmp_path_factory.mktemp("ft")
    out = root / "run"
    said = []
    res = sim_nodes.run_ft(
        NODES,
        PER_NODE,
        "configs/tiny.yaml",
        [*OVERRIDES, f"output_dir={out}"],
        timeout=900,
        env=rank_env(),
        kill_node=KILL,
        kill_at=KILL_AT,
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
    assert res["killed_at"][1] >= KILL_AT and res["restarted_at"][1] >= RESTART_AT
    for k in (0, 1):
        steps = _steps(recs, k)
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
        assert all(r["committed"] and r["loss"] == r["loss"] and abs(r["loss"]) < 100 for r in steps)
        # the step in flight when node 2 died may fail to commit anywhere: it is run again (not
        # applied twice); no other step is
        retried = [r["step"] for r in recs if r.get("event") == "retry" and r["replica"] == k]
        assert len(retried) <= 1 and all(KILL_AT < s <= RESTART_AT + 1 for s in retried), retried
    shrink = [r for r in recs if r.get("event") == "quorum" and r["replicas"] == [0, 1]]
    assert {r["replica"] for r in shrink} == {0, 1}
    assert all(KILL_AT < r["step"] <= RESTART_AT + 1 for r in shrink), shrink
    after = [r for r in _steps(recs, 0) if r["step"] == shrink[0]["step"]][0]
    assert after["replicas"] == [0, 1] and after["quorum_s"] < 30


def test_the_restarted_node_heals_and_equals_the_others_bit_for_bit(run):
    out, res, recs = run
    rejoin = [
        r
        for r in recs
        if r.get("event") == "quorum" and r["replica"] == KILL and r["healed"] and r["step"] > RESTART_AT
    ]
    assert len(rejoin) == 1, rejoin
    first = rejoin[0]["step"]
    assert rejoin[0]["replicas"] == [0, 1, 2]
    mine = _steps(recs, KILL)
    later = [r["step"] for r in mine if r["step"] >= first]
    assert later == list(range(first, STEPS + 1))  # it joined at the others' step and kept it
    by_step = {}
    for r in recs:
        if "theta_sha" in r:
            by_step.setdefault(r["step"], {})[r["replica"]] = (r["theta_sha"], r["adam_sha"])
    for step in range(first, STEPS + 1):
        assert len(by_step[step]) == 3 and len(set(by_step[step].values())) == 1, (step, by_step[step])
    for step in range(1, STEPS + 1):  # and the two survivors at every step
        assert by_step[step][0] == by_step[step][1], step


def test_one_writer_and_the_export_equals_the_offline_merge_of_the_adapter(run, tmp_path):
    out, res, recs = run
    summaries = [r for r in recs if r.get("event") == "summary"]
    assert sorted(r["replica"] for r in summaries) == [0, 1, 2]
    assert sum(bool(r["writer"]) for r in summaries) == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000250", f"step-{STEPS:06d}"]
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


# ------------------------------------------------------------------ the writer killed mid-checkpoint
# 2 nodes x 2 ranks, a checkpoint every 10 steps. The writer (node 0, the first participant) is
# killed while it writes checkpoint 10: gpart_ds/checkpoint.py's test-only hook
# (GPART_TEST_CKPT_PAUSE) holds it between the complete temporary folder and the rename, and the
# launcher kills node 0 once that temporary's manifest exists. Node 1 must train on and take over
# the writing, the temporary must never be read as a checkpoint, node 0 started again must heal.
W_STEPS, W_CKPT, W_RESTART_AT = 400, 10, 14


@pytest.fixture(scope="module")
def writer_killed(tmp_path_factory, tiny_assets):
    root = tmp_path_factory.mktemp("ftw")
    out = root / "run"
    temp = out / "checkpoints" / f".step-{W_CKPT:06d}.tmp"
    said = []
    res = sim_nodes.run_ft(
        2,
        PER_NODE,
        "configs/tiny.yaml",
        [
            f"train.max_steps={W_STEPS}",
            "train.log_every=50",
            "train.eval_examples=8",
            f"checkpoint.every_steps={W_CKPT}",
            "checkpoint.keep_last=2",
            "export.merged=true",
            f"output_dir={out}",
        ],
        timeout=900,
        env={**rank_env(), "GPART_TEST_CKPT_PAUSE": f"{W_CKPT}:60"},
        kill_node=0,
        kill_when=lambda: (temp / "manifest.json").is_file(),
        restart_at=W_RESTART_AT,
        say=lambda *a, **k: said.append(" ".join(map(str, a))),
    )
    if any(res["codes"].values()) or res["restarted_at"] is None:
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(root.glob("run.node*.log")))
        raise AssertionError(f"fault-tolerant run failed: {res} {said}\n{logs}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, res, recs, said


def test_writer_killed_mid_checkpoint_the_other_trains_on_and_takes_over(writer_killed):
    out, res, recs, said = writer_killed
    # the kill landed inside the write: node 0 had logged the pause, step 10's temporary was
    # complete, and the survivor had committed step 10 and nothing after it
    first_log = (out.parent / "run.node0.log").read_text()
    assert f"pausing 60 s before publishing checkpoint step {W_CKPT}" in first_log
    assert res["killed_at"][1] == W_CKPT, res
    steps = _steps(recs, 1)
    assert [r["step"] for r in steps] == list(range(1, W_STEPS + 1))
    assert all(r["committed"] and abs(r["loss"]) < 100 for r in steps)
    shrink = [r for r in recs if r.get("event") == "quorum" and r["replica"] == 1 and r["replicas"] == [1]]
    assert shrink and shrink[0]["step"] in (W_CKPT + 1, W_CKPT + 2), shrink


def test_the_half_published_checkpoint_is_never_taken(writer_killed):
    from gpart_ds import checkpoint

    out, res, recs, said = writer_killed
    ckpts = out / "checkpoints"
    # the killed writer's temporary stays (nobody else's to remove) but is never listed nor read
    assert (ckpts / f".step-{W_CKPT:06d}.tmp").is_dir()
    listed = checkpoint.list_checkpoints(ckpts)
    assert [p.name for p in listed] == [f"step-{W_STEPS:06d}", f"step-{W_STEPS - W_CKPT:06d}"]
    for p in listed:
        checkpoint.verify(p)
    assert (ckpts / "latest").read_text().strip() == f"step-{W_STEPS:06d}"
    resumed = [r["step"] for r in recs if r.get("event") == "resume" and r.get("replica") == 0]
    assert len(resumed) == 1 and resumed[0] > W_CKPT and resumed[0] % W_CKPT == 0, resumed


def test_the_restarted_writer_heals_bit_identical_and_the_export_is_the_offline_merge(writer_killed, tmp_path):
    out, res, recs, said = writer_killed
    rejoin = [r for r in recs if r.get("event") == "quorum" and r["replica"] == 0 and r["healed"]]
    assert len(rejoin) == 1 and rejoin[0]["replicas"] == [0, 1], rejoin
    first = rejoin[0]["step"]
    assert [r["step"] for r in _steps(recs, 0) if r["step"] >= first] == list(range(first, W_STEPS + 1))
    by_step = {}
    for r in recs:
        if "theta_sha" in r:
            by_step.setdefault(r["step"], {})[r["replica"]] = (r["theta_sha"], r["adam_sha"])
    for step in range(first, W_STEPS + 1):
        assert len(by_step[step]) == 2 and len(set(by_step[step].values())) == 1, (step, by_step[step])
    summaries = [r for r in recs if r.get("event") == "summary"]
    assert sorted(r["replica"] for r in summaries) == [0, 1] and sum(bool(r["writer"]) for r in summaries) == 1
    _assert_export_is_the_offline_merge(out, tmp_path)


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
