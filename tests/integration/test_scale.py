"""The frozen base partitioned within a node, simulated: CPU ranks as 2 "nodes" on this machine.

Each node is one torchrun agent (launch/sim_nodes.py); GROUP_RANK tells the nodes apart.
Two launches of the tiny model on 2 nodes x 2 ranks, every collective's bytes counted
(dist.count_comm):

    A  dist.frozen_partition=node     8 steps, checkpoints at 4 and 8, merged export
    B  dist.frozen_partition=global   plain ZeRO-3, resumes A's step 4 (node -> global), to step 8

B's steps 5-8 are plain ZeRO-3 steps from A's state, so theta equal after step 8 says
both that node-local partitioning trains exactly as plain ZeRO-3 (its shard-local load
included: B loads the base the usual way) and that its checkpoints resume on the other
layout. (Resuming on another world size is checked for every layout by
tests/integration/test_resume.py: checkpoints hold only the trainables.)

The planner counts a gather per use of a weight, which is what DeepSpeed does in a fresh
run of the tiny model (A: exact) and for any model whose layers exceed
stage3_max_reuse_distance (Llama-70B). A resumed run records its prefetch trace in a
training step instead of the evaluation that precedes training, and then keeps part of
this small model gathered from forward to backward: for B the planner is an upper bound.
Its fresh global-mode run equals the planner exactly too (recorded in
tests/plan/test_step.py::MEASURED_TINY_2x2).
"""

import json
import shutil
import sys

import pytest
import torch

from gpart_ds import commcount, plan
from gpart_ds.config import load_config
from gpart_ds.export.offline import merge_offline
from gpart_ds.plan import cluster as plan_cluster, step as plan_step
from tests.export_helpers import raw_bytes, read_folder
from tests.helpers import REPO, theta_of

sys.path.insert(0, str(REPO / "launch"))
import sim_nodes  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NODES, PER_NODE, STEPS = 2, 2, 8
COMMON = [
    f"train.max_steps={STEPS}",
    "train.log_every=4",
    "train.eval_examples=8",
    "train.micro_batch_size=4",
    "model.gradient_checkpointing=true",
    "dist.count_comm=true",
    "checkpoint.every_steps=4",
]
RUNS = {
    "A": ["dist.frozen_partition=node", "export.merged=true"],
    "B": ["dist.frozen_partition=global", "train.resume=auto"],
}
RESUME_FROM = {"B": ("A", 4)}
# DeepSpeed records its prefetch trace in the first steps of a fresh run (and checks it
# across ranks with a few broadcasts); from step 4 on every step is the same.
STEADY = range(4, STEPS + 1)


def _overrides(name, root):
    return [*COMMON, *RUNS[name], f"output_dir={root / name}"]


@pytest.fixture(scope="module")
def sims(tmp_path_factory, tiny_assets):
    root = tmp_path_factory.mktemp("scale")
    for name in RUNS:
        out = root / name
        if name in RESUME_FROM:
            src, step = RESUME_FROM[name]
            ck = f"step-{step:06d}"
            shutil.copytree(root / src / "checkpoints" / ck, out / "checkpoints" / ck)
        procs = sim_nodes.run(NODES, PER_NODE, "configs/tiny.yaml", _overrides(name, root), timeout=900)
        if any(p.returncode for p in procs):
            logs = "\n".join((root / f"{name}.node{k}.log").read_text()[-3000:] for k in range(NODES))
            raise AssertionError(f"simulated run {name} failed: {[p.returncode for p in procs]}\n{logs}")
    return root


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _planned(root, name, mode):
    cfg = load_config("configs/tiny.yaml", _overrides(name, root), check_files=False)
    arch, _ = plan.arch_for_config(cfg)
    b = plan.dtype_bytes(cfg.model.precision)
    return plan_step.estimate_step(
        arch,
        cfg.method,
        mode,
        plan_cluster.RankLayout(NODES, PER_NODE, PER_NODE),
        plan_cluster.PRESETS["h100"],
        micro_batch=cfg.train.micro_batch_size,
        seq=cfg.data.max_length,
        grad_accum=cfg.train.grad_accum,
        dtype_bytes=b,
        grad_ckpt=cfg.model.gradient_checkpointing,
        zero=cfg.deepspeed["zero_optimization"],
        comm_dtype_bytes=plan_step.comm_dtype_bytes(cfg.deepspeed, b),
    )


def _steps(root, name, steps):
    """Per rank: {step phase: bytes summary} for these steps."""
    out = []
    for dump in commcount.load(root / name / "comm"):
        s = commcount.summarize(dump)
        out.append({p: s[p] for p in commcount.step_phases(s) if int(p.split()[1]) in steps})
    return out


def _model_bytes():
    arch, _ = plan.arch_for_config(load_config("configs/tiny.yaml", check_files=False))
    return arch.n_params * 4


def test_node_local_trains_as_plain_zero3_and_resumes_on_the_other_layout(sims):
    a, b = theta_of(sims / "A"), theta_of(sims / "B")
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    recs = _records(sims / "B")
    assert any(r.get("event") == "resume" and r["step"] == RESUME_FROM["B"][1] for r in recs)
    assert [r["step"] for r in recs if "loss" in r and "step" in r] == list(range(5, STEPS + 1))
    assert _records(sims / "A")[-1]["world"] == _records(sims / "B")[-1]["world"] == 4
    assert commcount.load(sims / "A" / "comm")[0]["frozen_groups"] == [[0, 1], [2, 3]]
    assert commcount.load(sims / "B" / "comm")[0]["frozen_groups"] == [[0, 1, 2, 3]]


def test_node_local_bytes_per_step_equal_the_planner(sims):
    est = _planned(sims, "A", "node")
    ranks = _steps(sims, "A", STEADY)
    assert len(ranks) == NODES * PER_NODE and all(len(r) == len(STEADY) for r in ranks)
    for r in ranks:
        for phase, s in r.items():
            assert s["inter"] == est.inter_bytes, (phase, s["inter"], est.inter_bytes)
            assert s["intra"] == est.intra_bytes, (phase, s["intra"], est.intra_bytes)


def test_inter_node_bytes_are_o_of_d_in_node_mode_and_o_of_model_in_global(sims):
    d = load_config("configs/tiny.yaml", check_files=False).method.d
    node, glob = _planned(sims, "A", "node"), _planned(sims, "B", "global")
    assert node.inter_bytes <= 4 * 4 * d  # a few times d x 4 bytes
    assert glob.inter_bytes >= 0.5 * _model_bytes() and glob.inter_bytes > 30 * node.inter_bytes
    # global: the frozen model crosses nodes in every step (at least once; the planner's
    # 2.5 gathers of it per step are the bound), over 10x node mode's bytes
    ranks = _steps(sims, "B", range(5, STEPS + 1))
    assert len(ranks) == NODES * PER_NODE and all(len(r) == STEPS - 4 for r in ranks)
    for r in ranks:
        for phase, s in r.items():
            assert s["payload"]["all_gather/cross"] >= _model_bytes(), phase
            assert 10 * node.inter_bytes < s["inter"] <= glob.inter_bytes, (phase, s["inter"])
            assert s["intra"] <= glob.intra_bytes, (phase, s["intra"])
    # No collective crossing nodes ever moves more than 8 d bytes at once in node mode, in
    # any phase (start-up, evaluation, checkpoints, export included); the model is 509 KB.
    for dump in commcount.load(sims / "A" / "comm"):
        nodes = dump["nodes"]
        for rec in dump["records"]:
            if len({i for i, n in enumerate(nodes) for r in rec["group"] if r in n}) > 1:
                assert max(int(s) for s in rec["sizes"]) <= 8 * d, rec
    assert _model_bytes() > 10 * 8 * d


def test_summary_reports_the_last_steps_bytes(sims):
    s = _records(sims / "A")[-1]
    assert s["comm_inter_node_bytes_last_step"] == _planned(sims, "A", "node").inter_bytes
    assert (sims / "A" / "comm" / "comm-rank3.json").is_file()


def test_merged_export_of_the_node_local_run_equals_the_offline_merge(tmp_path, sims):
    out = sims / "A"
    prov = json.loads((out / "merged" / "gpart_merge.json").read_text())
    assert prov["ranks"] == 4
    merge_offline(REPO / ".cache" / "tiny" / "model", out / "adapter", tmp_path / "offline")
    m, off = read_folder(out / "merged"), read_folder(tmp_path / "offline")
    assert m.keys() == off.keys()
    for k in m:
        assert raw_bytes(m[k]) == raw_bytes(off[k]), k
