"""The planner's fault-tolerance figures (gpart_ds/plan/faults.py): the per-step quorum cost
and the GPU-hours per fault, fault-tolerant against requeue-and-resume, by hand."""

import json

import pytest

from gpart_ds.plan import cli as plan_cli
from gpart_ds.plan.arch import PlanError
from gpart_ds.plan.faults import QUORUM_S_MEASURED, FaultParams, estimate_faults


def _est(**kw):
    args = dict(
        nodes=4,
        gpus_per_node=2,
        step_s=10.0,
        base_bytes_per_node=100e9,
        every_steps=20,
        trainables=1_000,
        net_gbps=1.0,
        params=FaultParams(quorum_s=0.5, heartbeat_s=3.0, load_gbps=4.0, startup_s=15.0),
    )
    return estimate_faults(**{**args, **kw})


def test_requeue_and_resume_costs_every_gpu_startup_reload_and_half_an_interval():
    e = _est()
    assert e.load_s == pytest.approx(25.0)  # 100 GB / 4 GB/s
    assert e.requeue_s == pytest.approx(15 + 25 + 10 * 10.0)  # 20/2 steps of 10 s
    assert e.requeue_gpu_h == pytest.approx(140 * 8 / 3600)


def test_fault_tolerant_costs_survivors_a_timeout_and_a_step_and_the_restarted_node_its_rejoin():
    e = _est()
    assert e.heal_bytes_per_rank == 500 * 12  # 1000 trainables over 2 ranks, fp32 + two moments
    assert e.heal_s == pytest.approx(6_000 / 1e9)
    assert e.survivors_s == pytest.approx(3 + 10)
    assert e.rejoin_s == pytest.approx(15 + 25 + 6e-6)
    # 3 live nodes x 2 GPUs lose 13 s; the restarted node's 2 GPUs are out 40 s
    assert e.ft_gpu_h == pytest.approx((13 * 6 + (40 + 6e-6) * 2) / 3600)
    assert e.saved_gpu_h == pytest.approx(e.requeue_gpu_h - e.ft_gpu_h)


def test_quorum_cost_per_step_and_break_even():
    e = _est()
    assert e.quorum_gpu_h_per_step == pytest.approx(0.5 * 8 / 3600)
    assert e.break_even_steps == pytest.approx(e.saved_gpu_h / e.quorum_gpu_h_per_step)
    assert _est(params=FaultParams(quorum_s=0.0)).break_even_steps == float("inf")


def test_more_nodes_save_more_per_fault():
    # the requeue pays on every GPU, fault tolerance only on the restarted node's beyond a step
    assert _est(nodes=8).saved_gpu_h > _est(nodes=4).saved_gpu_h
    assert _est(nodes=1).ft_gpu_h == pytest.approx(_est(nodes=1).rejoin_s * 2 / 3600)


def test_bad_parameters_are_refused():
    with pytest.raises(PlanError, match="ft-load-gbps"):
        _est(params=FaultParams(load_gbps=0))
    with pytest.raises(PlanError, match="ft-heartbeat-s"):
        _est(params=FaultParams(heartbeat_s=-1))


def test_default_quorum_is_the_measured_median():
    assert FaultParams().quorum_s == QUORUM_S_MEASURED == 0.020


def _plan_json(capsys, *extra):
    status = plan_cli.main(
        ["--config", "configs/llama70b.yaml", "--nodes", "8", "--gpus-per-node", "8", "--gpu-mem-gb", "80", "--json"]
        + list(extra)
    )
    assert status == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


def test_planner_70b_fault_figures(capsys):
    js = _plan_json(capsys, "--ft-load-gbps", "4", "--ft-startup-s", "30", "dist.fault_tolerance=nodes")
    ft = js["fault_tolerance"]
    assert ft["enabled"] is True and ft["method"] == "gpart"
    assert ft["params"] == {"quorum_s": 0.02, "heartbeat_s": 5.0, "load_gbps": 4.0, "startup_s": 30.0}
    step = js["methods"]["gpart/node"]["step_time_s"]
    assert ft["step_s"] == step
    assert ft["base_bytes_per_node"] == pytest.approx(70.55e9 * 2, rel=1e-3)  # bf16 Llama-3-70B
    assert ft["checkpoint_every_steps"] == 50  # configs/llama70b.yaml
    assert ft["heal_bytes_per_rank"] == 2**21 // 8 * 12
    requeue = 30 + ft["base_bytes_per_node"] / 4e9 + 25 * step
    assert ft["requeue_gpu_h_per_fault"] == pytest.approx(requeue * 64 / 3600)
    ft_s = (5 + step) * 56 + (30 + ft["base_bytes_per_node"] / 4e9 + ft["heal_s"]) * 8
    assert ft["ft_gpu_h_per_fault"] == pytest.approx(ft_s / 3600)
    assert ft["quorum_gpu_h_per_step"] == pytest.approx(0.02 * 64 / 3600)


def test_planner_states_fault_tolerance_for_a_config_without_it(capsys):
    js = _plan_json(capsys)
    assert js["fault_tolerance"]["enabled"] is False
    assert js["fault_tolerance"]["saved_gpu_h_per_fault"] > 0
