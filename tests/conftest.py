import json
import os

import pytest
import torch

# Triton kernels are decorated at import: without a GPU they must run in Triton's
# interpreter, so set it before any test module imports gpart_ds.methods.gpart.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Fixtures that train or start something once for several tests (module-scoped ones, and
# these session ones, used across files): under pytest-xdist (`-n auto`, pyproject.toml)
# every worker would build its own copy, so tests run on workers by group (`--dist
# loadgroup`): the tests of one file together, and every test of a shared session fixture.
SHARED_FIXTURES = ("deepspeed_tiny_run", "bench_quick", "faults")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        shared = [f for f in SHARED_FIXTURES if f in getattr(item, "fixturenames", ())]
        item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.nodeid.split("::")[0]))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device (none here); launch/gpu_check.sh runs these")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_assets():
    """The tiny model and data (created once, atomically, by the asset recipe)."""
    from gpart_ds import assets

    return assets.ensure("tiny")


@pytest.fixture(scope="session")
def deepspeed_tiny_run(tmp_path_factory, tiny_assets):
    """`deepspeed --num_gpus 2 launch/train.py` on the tiny config: the reference the other
    launchers (sbatch, mpirun) must reproduce. Returns (output_dir, completed process)."""
    from tests.helpers import CHOICES_EVAL, LAUNCH_OVERRIDES, run_deepspeed

    out = tmp_path_factory.mktemp("deepspeed_tiny") / "run"
    # This run also feeds the metrics sinks' test (TensorBoard (auto) and W&B offline) and
    # the per-record verdicts' (train.eval_predictions, gathered from both ranks). Its eval
    # records carry multi-token choices (2 or 3), so the ranks also score choices through
    # the shared-prompt KV cache under ZeRO-3 (compared with one process in test_launch).
    evals = out.parent / CHOICES_EVAL
    with open(tiny_assets / "data" / "eval.jsonl") as src, open(evals, "w") as dst:
        for i, line in enumerate(src):
            rec = json.loads(line)
            words = rec["prompt"].removeprefix("Reverse: ").removesuffix("\nAnswer:").split()
            other = [
                c for c in (" " + " ".join(words), " " + words[0], " none", " none of it") if c != rec["completion"]
            ]
            choices = [rec["completion"], *other[: 1 + i % 2]]
            dst.write(json.dumps({**rec, "choices": choices}) + "\n")
    proc = run_deepspeed(
        2,
        "launch/train.py",
        "--config",
        "configs/tiny.yaml",
        f"output_dir={out}",
        f"data.eval={evals}",
        *LAUNCH_OVERRIDES,
        "log.wandb=true",
        "log.wandb_mode=offline",
        "train.eval_predictions=true",
        env={"WANDB_SILENT": "true"},
    )
    return out, proc


@pytest.fixture(scope="session")
def bench_quick(tmp_path_factory, tiny_assets):
    """`python -m experiments.bench --quick` with every method and the merged export: the
    benchmark's pipeline test and the baselines' runs (test_baselines) in one go."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    out = tmp_path_factory.mktemp("bench") / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench",
            "--quick",
            "--methods",
            "gpart,lora,vera,full",
            "--eval-examples",
            "8",
            "--out",
            str(out),
            "export.merged=true",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def faults(tmp_path_factory, tiny_assets):
    """The fault probes' shared state (tests/faults): one warm fork server that runs each
    CLI call in a fresh fork, and the shared inputs (one tiny run, model variants) built
    lazily under one folder."""
    from types import SimpleNamespace

    from tests.faults.fixtures import Fx
    from tests.faults.runner import ForkServer

    root = tmp_path_factory.mktemp("faults")
    server = ForkServer(log=root / "forkserver.log")
    yield SimpleNamespace(server=server, fx=Fx(root / "shared", server), root=root / "cases")
    server.close()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Refuse to run ungrouped under --dist loadgroup: xdist marks a group by suffixing the
    test ids, which pytest >= 9.2 ignores (pytest-xdist#1386), and the suite would then pass
    while building every shared fixture once per worker. Checked on the controller, on the
    ids a worker collected, so the run stops with this message and no test started."""
    if node.config.getoption("dist") == "loadgroup" and ids and "@" not in ids[0]:
        pytest.exit(
            f"pytest-xdist's --dist loadgroup does not group with pytest {pytest.__version__} "
            "(pytest-xdist#1386): install the pytest pinned in pyproject.toml's dev extra "
            "(bash launch/setup_env.sh does)",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
