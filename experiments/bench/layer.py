"""One adapted layer, forward + backward: GPart's op against what it replaces.

    python -m experiments.bench.layer [--out-features 1536 --in-features 576 --tokens 2048
                                    --d 65536 --dtype fp32 --repeat 5 --json out.json]

Same shape, same input, same upstream gradient, in one process:
  frozen     x @ W0^T, gradient for x only (the floor: what any adapter pays)
  trainable  x @ W^T, gradients for x and W (full fine-tuning's layer)
  lora       frozen + x @ A^T @ B^T, rank 8 (PEFT's computation, without PEFT's wrapper)
  gpart      the GPart op (methods.gpart.op.gpart_linear) with eager and with compiled kernels, and
             compiled with reuse_ids (the forward's group ids kept for the backward);
             on CUDA with triton also method.kernel=triton: the fused GEMMs, the split
             path (one-pass Triton kernels + cuBLAS) and the per-shape choice (auto)
and the delta-generation throughput (elements of W0 + delta per second) of the fused
(compiled) kernel vs eager. Times are medians after warm-up; the first compiled call
(compilation) is excluded and reported. Defaults are SmolLM2-135M's MLP up-projection
with a 2,048-token micro-batch; --preset llama70b uses Llama-70B's (28672 x 8192).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from gpart_ds.fileio import write_atomic
from gpart_ds.methods.gpart.kernels import triton_unavailable
from gpart_ds.methods.gpart.layer import kernel_set, linear_function
from gpart_ds.methods.gpart.op import OpConfig
from gpart_ds.methods.gpart.partition import group_counts, hash_base, scales_from_counts
from gpart_ds.targets import Target

PRESETS = {
    "smollm2": dict(out_features=1536, in_features=576, tokens=2048, d=65536),
    "llama70b": dict(out_features=28672, in_features=8192, tokens=4096, d=1 << 21),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, repeat: int, dev) -> tuple[float, float]:
    """(first call seconds, median of `repeat` later calls)."""
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    first = time.perf_counter() - t0
    fn()  # a second warm-up: allocator and caches settled
    times = []
    for _ in range(repeat):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def bench(
    out_features: int,
    in_features: int,
    tokens: int,
    d: int,
    dtype: torch.dtype,
    repeat: int = 5,
    rank: int = 8,
    device: str | None = None,
) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(out_features, in_features, generator=g) * 0.02).to(dev, dtype)
    x = torch.randn(tokens, in_features, generator=g).to(dev, dtype)
    gy = torch.randn(tokens, out_features, generator=g).to(dev, dtype)
    n = out_features * in_features
    # One layer alone: D = n, so group sizes (and s) are those of this layer.
    seed = 0
    scales = scales_from_counts(group_counts(0, n, min(d, n), seed, device=dev)).to(dev)
    d = min(d, n)
    theta = (torch.randn(d, generator=g) * 1e-3).to(dev)
    spec = Target("layer", (out_features, in_features), 0)

    def frozen():
        xi = x.detach().requires_grad_(True)
        (xi @ w0.t()).backward(gy)

    wt = w0.detach().clone().requires_grad_(True)

    def trainable():
        xi = x.detach().requires_grad_(True)
        wt.grad = None
        (xi @ wt.t()).backward(gy)

    a = (torch.randn(rank, in_features, generator=g) * 0.01).to(dev, dtype).requires_grad_(True)
    b = (torch.randn(out_features, rank, generator=g) * 0.01).to(dev, dtype).requires_grad_(True)

    def lora():
        xi = x.detach().requires_grad_(True)
        a.grad = b.grad = None
        (xi @ w0.t() + (xi @ a.t()) @ b.t() * 2.0).backward(gy)

    def gpart(mode, reuse=False, path="auto"):
        cfg = OpConfig(d=d, seed=seed, kernels=kernel_set(mode), reuse_ids=reuse)
        linear = linear_function(cfg.kernels)  # what a GPart layer with these kernels runs
        th = theta.detach().clone().requires_grad_(True)

        def run():
            os.environ["GPART_TRITON_PATH"] = path  # read by triton_op per call (mode triton only)
            xi = x.detach().requires_grad_(True)
            th.grad = None
            linear(xi, w0, None, th * scales, spec, cfg).backward(gy)

        return run

    flops = 2 * tokens * n  # one GEMM
    res = {
        "shape": [out_features, in_features],
        "tokens": tokens,
        "d": d,
        "dtype": str(dtype),
        "device": str(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": (
            torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
        ),
        "gemm_flops": flops,
        "layers": {},
    }
    jobs = {
        "frozen": frozen,
        "trainable": trainable,
        "lora": lora,
        "gpart_eager": gpart("eager"),
        "gpart_compiled": gpart("compiled"),
        "gpart_compiled_reuse_ids": gpart("compiled", reuse=True),
    }
    triton = dev.type == "cuda" and triton_unavailable(dev, d) is None
    if triton:  # the Triton kernels (CUDA); auto's first call times both paths (its first_call_s)
        jobs.update(
            {
                "gpart_triton": gpart("triton"),
                "gpart_triton_fused": gpart("triton", path="fused"),
                "gpart_triton_split": gpart("triton", path="split"),
            }
        )
    for name, fn in jobs.items():
        first, med = _median_time(fn, repeat, dev)
        res["layers"][name] = {"fwd_bwd_s": med, "first_call_s": first}
    base = res["layers"]["frozen"]["fwd_bwd_s"]
    for r in res["layers"].values():
        r["vs_frozen"] = r["fwd_bwd_s"] / base
        r["vs_lora"] = r["fwd_bwd_s"] / res["layers"]["lora"]["fwd_bwd_s"]
        r["vs_trainable"] = r["fwd_bwd_s"] / res["layers"]["trainable"]["fwd_bwd_s"]

    # Delta generation alone: W0 + delta for the whole weight.
    flat = w0.reshape(-1)
    ts = theta * scales
    hb = torch.tensor(hash_base(seed, 0), device=dev)
    gen = {}
    for mode in ("eager", "compiled") + (("triton",) if triton else ()):
        k = kernel_set(mode)
        first, med = _median_time(lambda k=k: k.effective_weight(flat, ts, hb, d), repeat, dev)
        gen[mode] = {"elems_per_s": n / med, "first_call_s": first}
    gen["fused_speedup"] = gen["compiled"]["elems_per_s"] / gen["eager"]["elems_per_s"]
    if triton:
        # W0 read + W0 + delta written; theta * s gathered from L2 (d x 4 bytes) not counted
        gen["triton"]["hbm_bytes_per_s"] = gen["triton"]["elems_per_s"] * 2 * w0.element_size()
    res["delta_generation"] = gen
    return res


def format_report(res: dict) -> str:
    o, i = res["shape"]
    lines = [
        f"one {o} x {i} layer, {res['tokens']} tokens, d={res['d']:,}, {res['dtype']}, "
        f"{res['device']} ({res['machine']}, {res['threads']} threads), torch {res['torch']}",
        "",
        "| layer | fwd+bwd ms | vs frozen | vs LoRA | vs trainable |",
        "|---|---|---|---|---|",
    ]
    for name, r in res["layers"].items():
        lines.append(
            f"| {name} | {1e3 * r['fwd_bwd_s']:.2f} | {r['vs_frozen']:.2f}x | {r['vs_lora']:.2f}x | "
            f"{r['vs_trainable']:.2f}x |"
        )
    g = res["delta_generation"]
    lines += [
        "",
        f"delta generation (W0 + delta): eager {g['eager']['elems_per_s'] / 1e6:.0f} M elem/s, "
        f"fused {g['compiled']['elems_per_s'] / 1e6:.0f} M elem/s ({g['fused_speedup']:.1f}x)",
    ]
    if "triton" in g:
        lines.append(
            f"triton one-pass kernel: {g['triton']['elems_per_s'] / 1e6:.0f} M elem/s, "
            f"{g['triton']['hbm_bytes_per_s'] / 1e9:.0f} GB/s of W0 read + written"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    ap.add_argument("--out-features", type=int)
    ap.add_argument("--in-features", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--d", type=int)
    ap.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: bf16 on GPUs, fp32 on CPU (what training uses there)",
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    shape = dict(PRESETS[args.preset])
    for k in shape:
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    res = bench(dtype=dtype, repeat=args.repeat, device=args.device, **shape)
    print(format_report(res), flush=True)
    if args.json:
        write_atomic(args.json, json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
