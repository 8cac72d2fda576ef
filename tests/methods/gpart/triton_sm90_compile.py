"""Compile every GPart Triton kernel for an H100/H200 (sm_90) without a GPU.

    python tests/methods/gpart/triton_sm90_compile.py        (TRITON_INTERPRET must be unset)

Triton lowers to PTX with its bundled LLVM and to a cubin with its bundled ptxas, so
type errors that the interpreter lets through surface here. Prints one JSON line per
kernel: compile seconds, SASS instructions, local-memory spill instructions (STL),
and for the elementwise kernels the SASS instructions per element.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gpart_ds.methods.gpart import triton as tk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _sass_ops(cubin: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([str(CUOBJDUMP), "-sass", fh.name], capture_output=True, text=True, check=True).stdout
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", out)


def compile_kernel(name, fn, types, consts, num_warps, num_stages=3, elems=None):
    sig = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
    t0 = time.perf_counter()
    k = triton.compile(
        ASTSource(fn, sig, consts),
        target=TARGET,
        options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False),
    )
    secs = time.perf_counter() - t0
    ops = _sass_ops(k.asm["cubin"])
    row = {
        "kernel": name,
        "compile_s": round(secs, 2),
        "sass": len(ops),
        "spills": sum(o.startswith("STL") for o in ops),
        "mma": sum(o.startswith(("HGMMA", "HMMA", "DMMA")) for o in ops),
    }
    if elems:
        row["sass_per_element"] = round(len(ops) / elems, 1)
    print(json.dumps(row), flush=True)
    return row


def main():
    elem = dict(
        ts_ptr="*fp32",
        base_ptr="*i64",
        keep_ptr="*i64",
        scale_ptr="*fp32",
        w0_ptr="*bf16",
        out_ptr="*bf16",
        dw_ptr="*bf16",
        grad_ptr="*fp32",
        ids_ptr="*i32",
    )
    per_thread = 2048 // (8 * 32)
    variants = {
        "effective_weight": dict(W=1, SCATTER=False, COUNT=False, IDS=0, KEEP=False, PREAGG=False),
        "effective_weight_dropout": dict(W=1, SCATTER=False, COUNT=False, IDS=0, KEEP=True, PREAGG=False),
        "backward_pass": dict(W=1, SCATTER=True, COUNT=False, IDS=0, KEEP=False, PREAGG=False),
        "scatter_preagg": dict(W=0, SCATTER=True, COUNT=False, IDS=0, KEEP=False, PREAGG=True),
        "count_groups": dict(W=0, SCATTER=False, COUNT=True, IDS=0, KEEP=False, PREAGG=False),
    }
    for name, c in variants.items():
        types = dict(elem, grad_ptr="*i32") if c["COUNT"] else elem
        compile_kernel(name, tk._elementwise_kernel, types, dict(c, INTERP=False, BLOCK=2048), 8, elems=per_thread)
    wide = dict(
        elem, ts_ptr="*fp64", scale_ptr="*fp64", w0_ptr="*fp16", out_ptr="*fp16", dw_ptr="*fp16", grad_ptr="*fp64"
    )  # fp16 weights, fp64 theta (the float64 tests)
    compile_kernel(
        "backward_pass_fp16_fp64",
        tk._elementwise_kernel,
        wide,
        dict(variants["backward_pass"], KEEP=True, INTERP=False, BLOCK=2048),
        8,
        elems=per_thread,
    )
    gemm = dict(ACC=tl.float32, INTERP=False, PREC="ieee", GROUP=8)
    for kind, fn, types, extra in (
        (
            "forward",
            tk._forward_kernel,
            dict(
                x_ptr="*bf16",
                w0_ptr="*bf16",
                ts_ptr="*fp32",
                bias_ptr="*bf16",
                y_ptr="*bf16",
                scale_ptr="*fp32",
                base="i64",
                keep_base="i64",
            ),
            dict(HAS_BIAS=True, KEEP=False),
        ),
        (
            "grad_x",
            tk._grad_x_kernel,
            dict(
                g_ptr="*bf16",
                w0_ptr="*bf16",
                ts_ptr="*fp32",
                dx_ptr="*bf16",
                scale_ptr="*fp32",
                base="i64",
                keep_base="i64",
            ),
            dict(KEEP=False),
        ),
        (
            "grad_ts",
            tk._grad_ts_kernel,
            dict(g_ptr="*bf16", x_ptr="*bf16", grad_ptr="*fp32", scale_ptr="*fp32", base="i64", keep_base="i64"),
            dict(KEEP=False, PREAGG=False),
        ),
    ):
        for cfg in tk._gemm_configs(kind):
            blocks = {k: v for k, v in cfg.kwargs.items() if k.startswith("BLOCK")}
            compile_kernel(
                f"{kind} {tuple(blocks.values())}",
                fn,
                types,
                dict(gemm, **extra, **cfg.kwargs),
                cfg.num_warps,
                cfg.num_stages,
            )


if __name__ == "__main__":
    main()
