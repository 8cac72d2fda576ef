"""Throughput of the GPart elementwise kernels: compiled (fused) vs eager.

    python -m experiments.bench.kernels [--rows 4096 --cols 4096 --d 524288 --repeat 5 --json out.json]

For each kernel, elements per second of one weight-sized slice, after warm-up (the
first compiled call, which compiles, is timed separately and reported as compile_s).
backward_pass is the fused backward (hash once; scatter dL/dW and rebuild W0 + delta):
compare it with effective_weight + scatter_grad, what backward would cost unfused.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from gpart_ds.fileio import write_atomic
from gpart_ds.methods.gpart.kernels import triton_unavailable
from gpart_ds.methods.gpart.layer import kernel_set
from gpart_ds.methods.gpart.partition import hash_base

KERNELS = ("effective_weight", "scatter_grad", "backward_pass", "count_groups")


def _time(fn, repeat: int) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(rows: int, cols: int, d: int, repeat: int, dtype=torch.bfloat16) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = rows * cols
    w0 = torch.randn(n, device=dev).to(dtype)
    dw = torch.randn(n, device=dev).to(dtype)
    ts = torch.randn(d, device=dev)
    base = torch.tensor(hash_base(1234, 10**9), device=dev)
    out = {
        "rows": rows,
        "cols": cols,
        "elements": n,
        "d": d,
        "dtype": str(dtype),
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    modes = ("eager", "compiled") + (("triton",) if dev.type == "cuda" and triton_unavailable(dev, d) is None else ())
    out["modes"] = list(modes)
    for mode in modes:
        k = kernel_set(mode)
        jobs = {
            "effective_weight": lambda k=k: k.effective_weight(w0, ts, base, d),
            "scatter_grad": lambda k=k: k.scatter_grad(torch.zeros_like(ts), dw, base, d),
            "backward_pass": lambda k=k: k.backward_pass(w0, dw, ts, torch.zeros_like(ts), base, d),
            "count_groups": lambda k=k: k.count_groups(base, n, d),
        }
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            first = time.perf_counter() - t0
            secs = _time(fn, repeat)
            out[f"{name}.{mode}.elems_per_s"] = n / secs
            if mode == "compiled":
                out[f"{name}.compile_s"] = first
    for name in KERNELS:
        out[f"{name}.speedup"] = out[f"{name}.compiled.elems_per_s"] / out[f"{name}.eager.elems_per_s"]
        if "triton" in modes:  # the Triton kernels against the compiled ones (CUDA)
            out[f"{name}.triton_vs_compiled"] = out[f"{name}.triton.elems_per_s"] / out[f"{name}.compiled.elems_per_s"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--d", type=int, default=524288)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    res = bench(args.rows, args.cols, args.d, args.repeat)
    print(
        f"GPart kernels, {args.rows}x{args.cols} bf16 weight, d={args.d}, {res['device']}, "
        f"{res['threads']} threads, torch {res['torch']}"
    )
    print(f"{'kernel':<18}{'eager M elem/s':>16}{'compiled M elem/s':>20}{'speedup':>10}{'compile s':>11}")
    for name in KERNELS:
        print(
            f"{name:<18}{res[name + '.eager.elems_per_s'] / 1e6:>16.1f}"
            f"{res[name + '.compiled.elems_per_s'] / 1e6:>20.1f}{res[name + '.speedup']:>9.1f}x"
            f"{res[name + '.compile_s']:>11.1f}"
            + (
                f"   triton {res[name + '.triton.elems_per_s'] / 1e6:.1f} M elem/s "
                f"({res[name + '.triton_vs_compiled']:.1f}x compiled)"
                if "triton" in res["modes"]
                else ""
            )
        )
    if args.json:
        write_atomic(args.json, json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
