"""The memory planner and the dry run, from shapes only (no weights, no GPU)."""

import importlib.util

import pytest

from gpart_ds import plan
from gpart_ds.config import load_config
from gpart_ds.methods.gpart import partition
from gpart_ds.plan import cli as plan_cli
from tests.helpers import REPO

GIB = plan.GIB


@pytest.fixture(scope="module")
def llama70b():
    """configs/llama70b.yaml with the bundled Llama-3-70B config.json (model.path is not here)."""
    cfg = load_config("configs/llama70b.yaml", check_files=False)
    arch, source = plan.arch_for_config(cfg)
    assert source.endswith("configs/models/llama3-70b/config.json")
    return cfg, arch


def _plan_cli(capsys, *args):
    """`python -m gpart_ds.plan ARGS`, in this process: (exit status, stdout, stderr)."""
    status = plan_cli.main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


def _train_py(capsys, *args):
    """`python launch/train.py ARGS`, in this process (only for paths that start no ranks)."""
    spec = importlib.util.spec_from_file_location("gpart_train_entry", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    status = module.main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_llama70b_shapes_are_the_published_ones(llama70b):
    _, arch = llama70b
    assert arch.n_params == 70_553_706_496
    assert arch.D == 80 * (2 * 8192**2 + 2 * 1024 * 8192 + 3 * 8192 * 28672)
    assert len(arch.targets) == 560 and arch.layers == 80


def test_llama70b_fits_the_stated_cluster_and_its_rows_add_up(llama70b):
    cfg, arch = llama70b
    p = plan.plan_for_config(cfg, arch, world=64)
    verdict = plan.check_fit(p, 80)
    assert verdict.fits, verdict.message
    # the frozen partition is the model over 64 ranks, in bf16
    assert p.get("frozen weights") == pytest.approx(arch.n_params * 2 / 64, rel=1e-4)
    assert p.gpu_total == pytest.approx(sum(r.gpu for r in p.rows))
    # theta's per-rank state is O(d), not O(model)
    assert p.get("theta") < 0.01 * p.gpu_total


def test_one_80gb_gpu_is_refused_with_the_reason(llama70b):
    cfg, arch = llama70b
    verdict = plan.check_fit(plan.plan_for_config(cfg, arch, world=1), 80)
    assert not verdict.fits and "frozen weights" in verdict.message
    need = plan.min_nodes(lambda w: plan.check_fit(plan.plan_for_config(cfg, arch, w), 80).fits, 1)
    assert need is not None and 1 < need < 64


def test_cpu_offload_moves_the_frozen_partition_to_host_memory(llama70b):
    cfg, arch = llama70b
    off = load_config("configs/llama70b.yaml", ["deepspeed=ds_zero3_llama70b_offload.json"], check_files=False)
    on_gpu = plan.plan_for_config(cfg, arch, world=8)
    offloaded = plan.plan_for_config(off, arch, world=8)
    assert offloaded.host_total == pytest.approx(on_gpu.get("frozen weights") + offloaded.get("theta's"))
    assert offloaded.gpu_total < on_gpu.gpu_total - 15 * GIB
    assert not plan.check_fit(on_gpu, 40).fits and plan.check_fit(offloaded, 40).fits


def test_activation_checkpointing_and_micro_batch_move_the_activation_rows(llama70b):
    cfg, arch = llama70b
    on = plan.plan_for_config(cfg, arch, world=64)
    off = plan.plan_for_config(
        load_config("configs/llama70b.yaml", ["model.gradient_checkpointing=false"], check_files=False), arch, world=64
    )
    double = plan.plan_for_config(
        load_config("configs/llama70b.yaml", ["train.micro_batch_size=4"], check_files=False), arch, world=64
    )
    assert off.get("activations") > 10 * on.get("activations")
    assert double.get("activations") == pytest.approx(2 * on.get("activations"), rel=0.01)


def test_full_and_lora_estimates_for_the_benchmark(llama70b):
    _, arch = llama70b
    kw = dict(micro_batch=1, seq_len=4096, zero={"stage3_prefetch_bucket_size": 5e8})
    specs = {"gpart": plan.spec("gpart", d=2**21), "lora": plan.spec("lora"), "full": plan.spec("full")}
    plans = plan.compare_methods(arch, specs, worlds=(8, 16, 64), **kw)
    for w in (8, 16, 64):
        full, lora, gp = (plans[m, w].gpu_total for m in ("full", "lora", "gpart"))
        assert full > gp and full > lora
        # full fine-tuning keeps 16 bytes per parameter over the ranks
        assert plans["full", w].get("gradients") + plans["full", w].get("fp32 master") + plans["full", w].get(
            "trainable weights"
        ) == pytest.approx(16 * arch.n_params / w, rel=1e-3)
    assert plans["full", 8].gpu_total > 80 * GIB > plans["gpart", 8].gpu_total


def test_group_size_theory_agrees_with_exact_counts():
    D, d, seed = 1 << 22, 1 << 10, 10**12
    exact = partition.group_size_stats(D, d, seed)
    theory = partition.group_size_stats(D, d, seed, exact_limit=0)
    assert exact["method"] == "exact" and theory["method"] == "theory"
    assert exact["mean"] == theory["mean"] == D / d
    assert exact["sd"] == pytest.approx(theory["sd"], rel=0.05)
    # the observed extremes lie within one sd of their expected values
    assert abs(exact["min"] - theory["min"]) < theory["sd"]
    assert abs(exact["max"] - theory["max"]) < theory["sd"]


def test_plan_cli_fits_on_the_stated_cluster_and_refuses_one_gpu(capsys, llama70b):
    status, out, err = _plan_cli(
        capsys, "--config", "configs/llama70b.yaml", "--nodes", "8", "--gpus-per-node", "8", "--gpu-mem-gb", "80"
    )
    assert status == 0, err
    assert "OK fits" in out and "64 ranks" in out
    status, out, err = _plan_cli(
        capsys, "--config", "configs/llama70b.yaml", "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem-gb", "80"
    )
    assert status == 1
    assert "REFUSED does not fit" in out and "node(s) x 1 GPUs fit" in err


def test_plan_cli_without_a_model_description_names_the_key(capsys):
    status, _, err = _plan_cli(
        capsys,
        "--config",
        "configs/llama70b.yaml",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--gpu-mem-gb",
        "80",
        "model.arch_config=null",
    )
    assert status == 2
    assert "model.path" in err and "--model-config" in err


def test_dry_run_reports_targets_group_sizes_and_plan_without_training(tmp_path, tiny_assets, capsys):
    status, out, err = _train_py(
        capsys,
        "--config",
        "tiny",
        "--dry-run",
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--gpu-mem-gb",
        "4",
        f"output_dir={tmp_path}",
    )
    assert status == 0, err
    assert "no weights read" in out and "D = 86,016" in out and "d = 4,096" in out
    assert "group sizes n_g: mean 21.0" in out and "(exact" in out
    assert "ZeRO-3 on 2 ranks" in out and "OK fits" in out
    assert not any(tmp_path.iterdir()), "a dry run wrote outputs"


def test_dry_run_names_the_keys_the_method_ignores(capsys, llama70b):
    status, out, err = _train_py(
        capsys,
        "--config",
        "llama70b",
        "--dry-run",
        "--nodes",
        "8",
        "--gpus-per-node",
        "8",
        "--gpu-mem-gb",
        "80",
        "method.name=lora",
    )
    assert status == 0, err
    line = next(x for x in out.splitlines() if x.startswith("not read by lora (ignored): "))
    assert "method.d=2097152" in line and "method.step_per_weight=" in line and "method.r" not in line
    status, out, err = _train_py(
        capsys, "--config", "llama70b", "--dry-run", "--nodes", "8", "--gpus-per-node", "8", "--gpu-mem-gb", "80"
    )
    assert status == 0, err
    assert "not read by" not in out


def test_dry_run_of_the_70b_config_uses_the_bundled_shapes_and_theory(capsys, llama70b):
    status, out, err = _train_py(
        capsys, "--config", "llama70b", "--dry-run", "--nodes", "8", "--gpus-per-node", "8", "--gpu-mem-gb", "80"
    )
    assert status == 0, err
    assert "configs/models/llama3-70b/config.json" in out and "(theory" in out
    assert "q_proj x80 (8192x8192)" in out and "down_proj x80 (8192x28672)" in out


def test_vera_plan_holds_its_shared_projections_and_few_trainable_parameters(llama70b):
    _, arch = llama70b
    kw = dict(world=64, micro_batch=1, seq_len=4096)
    vera = plan.estimate(arch, method=plan.spec("vera"), **kw)
    lora = plan.estimate(arch, method=plan.spec("lora"), **kw)
    # A (256 x 28672... the largest in) and B (largest out x 256), bf16, whole on every rank
    assert vera.get("VeRA shared projections") == 256 * (28672 + 28672) * 2
    assert vera.get("VeRA scaling vectors") < lora.get("LoRA grads")
