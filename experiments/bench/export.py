"""Offline merge throughput and memory against a plain safetensors load-and-save.

    python -m experiments.bench.export --base .cache/models/SmolLM2-135M-Instruct \
        [--adapter ADAPTER_DIR] [--d 65536] [--json out.json]

Both jobs run in fresh subprocesses on the same base folder, one after the other:
  baseline   safetensors.torch.load_file of every file, then save_file (what a naive
             "load, add, save" merge costs before it adds anything)
  gpart      python -m gpart_ds.export (stream, add delta, pwrite), cold: includes
             torch.compile of the fused kernel and counting the D group sizes
  gpart_warm the same merge run a second time in the process (compilation excluded)
and report seconds, MB/s of model bytes and peak RSS above the interpreter baseline
(VmHWM after imports vs at the end). Without --adapter a random one is made (the
throughput does not depend on theta's values).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

_PRELUDE = """
import json, sys, time, gc
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
import torch, safetensors.torch, transformers
from gpart_ds import safetensors_io
from gpart_ds.export.offline import merge_offline
gc.collect()
before = rss()
t0 = time.perf_counter()
"""

_BASELINE = (
    _PRELUDE
    + """
base, out = sys.argv[1:3]
for f in safetensors_io.model_files(base):
    tensors = safetensors.torch.load_file(str(f))
    safetensors.torch.save_file(tensors, out + "/" + f.name, metadata={"format": "pt"})
    del tensors
print(json.dumps({"seconds": time.perf_counter() - t0, "before": before, "peak": hwm()}))
"""
)

_GPART = (
    _PRELUDE
    + """
base, adapter, out, repeat = sys.argv[1:5]
for _ in range(int(repeat)):   # a second run in the process excludes compilation
    t0 = time.perf_counter()
    stats = merge_offline(base, adapter, out, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "before": before, "peak": hwm(), **stats}))
"""
)


def _run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_adapter(base: Path, folder: Path, d: int, seed: int = 0) -> Path:
    import torch

    from gpart_ds.methods.gpart import adapter as adapter_io
    from gpart_ds.targets import build_layout, skeleton

    layout = build_layout(skeleton(str(base)), "all-linear")
    theta = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 0.01
    cfg = adapter_io.adapter_config(
        d=d,
        seed=seed,
        target_modules="all-linear",
        dropout=0.0,
        layout=layout,
        base_model={"name": base.name},
        dtype=torch.float32,
    )
    return adapter_io.save_adapter(folder, theta, cfg)


def bench(base: Path, adapter: Path | None, d: int) -> dict:
    from gpart_ds.safetensors_io import model_files

    model_bytes = sum(f.stat().st_size for f in model_files(base))
    with tempfile.TemporaryDirectory(prefix="gpart-bench-export-") as tmp:
        tmp = Path(tmp)
        adapter = adapter or random_adapter(base, tmp / "adapter", d)
        (tmp / "plain").mkdir()
        rows = {
            "baseline": _run(_BASELINE, str(base), str(tmp / "plain")),
            "gpart": _run(_GPART, str(base), str(adapter), str(tmp / "merged"), "1"),
            "gpart_warm": _run(_GPART, str(base), str(adapter), str(tmp / "merged"), "2"),
        }
    for r in rows.values():
        r["mb_per_s"] = model_bytes / 1e6 / r["seconds"]
        r["peak_growth_mb"] = (r["peak"] - r["before"]) / 1e6
    b, g = rows["baseline"], rows["gpart"]
    return {
        "base": str(base),
        "model_mb": model_bytes / 1e6,
        "machine": platform.processor() or platform.machine(),
        **rows,
        "time_ratio": g["seconds"] / b["seconds"],
        "peak_growth_ratio": g["peak_growth_mb"] / max(b["peak_growth_mb"], 1e-9),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--adapter", type=Path, default=None)
    ap.add_argument("--d", type=int, default=65536)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    r = bench(a.base, a.adapter, a.d)
    print(f"model {r['model_mb']:.0f} MB ({a.base})")
    print("| job | seconds | MB/s | peak RSS growth (MB) |\n|---|---|---|---|")
    for name in ("baseline", "gpart", "gpart_warm"):
        x = r[name]
        print(f"| {name} | {x['seconds']:.2f} | {x['mb_per_s']:.0f} | {x['peak_growth_mb']:.0f} |")
    warm = r["gpart_warm"]["seconds"] / r["baseline"]["seconds"]
    print(
        f"gpart / baseline: time {r['time_ratio']:.2f}x (warm {warm:.2f}x), "
        f"peak memory growth {r['peak_growth_ratio']:.2f}x"
    )
    if a.json:
        a.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
