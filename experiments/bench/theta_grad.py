"""What sets a method's first steps: its gradient's scale against Adam's eps, and how far
one Adam step moves the model (GPart's theta against LoRA's factors, or any methods).

    python -m experiments.bench.theta_grad --config configs/smollm2_rt.yaml
        [--methods name=lora,r=8 name=gpart,d=16384 name=gpart,d=131072] [--batches 4]
        [--reference-lr LR] [--line-mults 1 2 5 ...] [--json out.json] [key.sub=value ...]

On a few training micro-batches of the run config (its data, objective and packing; one
process, no DeepSpeed) it computes, for each method entry (`name=...` and its method.*
keys), the gradient of its trainable parameters at their initialisation, then:
- |g| quantiles, L2 norm (the trainer clips at train.max_grad_norm), the share of
  entries below Adam's eps: where |g| << eps, Adam's step is g/eps instead of ~lr;
- Adam's first update u (bias-corrected, betas and eps of the config) over the batches;
- the first-order loss decrease per unit lr, g . u (~ ||g||_1 for a sign-like step);
- the RMS movement of a target weight per unit lr: the merged weights (the method's own
  merge_source, W0 + delta) after one step along u, minus before, over every target
  (GPart: ||u||_2 / sqrt(D), as sum_j n_j s_j^2 = d; LoRA: (alpha/r) dB @ A, A does not
  move on the first step while B = 0);
- from those, the lr at which each method's first step matches the first entry's at
  --reference-lr (default: the first entry's train.lr=auto), by either measure;
- a one-step line search: the loss on the other micro-batches after one Adam step (u of
  the first batch) at each multiple (--line-mults) of the method's train.lr=auto: the lr
  at which a first step helps most.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from gpart_ds.config import ConfigError, load_config, resolved_lr
from gpart_ds.objective import trains_on_choices

DEFAULT_METHODS = ["name=lora,r=8", "name=gpart,d=16384", "name=gpart,d=131072"]


def parse_method(spec: str) -> list[str]:
    """'name=gpart,d=16384' -> ['method.name=gpart', 'method.d=16384']."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all("=" in p for p in parts) or not parts[0].startswith("name="):
        raise ConfigError(f"--methods {spec!r}: write name=METHOD[,key=value...], e.g. name=gpart,d=16384")
    return [f"method.{p}" for p in parts]


def _batches(cfg, n: int):
    from transformers import AutoTokenizer

    from gpart_ds import data

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    d = cfg.data
    train = data.tokenized_train(d, tok, cfg.model.path, choice_loss=trains_on_choices(cfg.train.objective))
    order = data.GlobalBatchOrder(len(train), cfg.train.micro_batch_size, 1, 1, cfg.train.seed)
    return [data.collate([train[i] for i in order.indices(s, 0, 0)], pad) for s in range(n)]


def adam_first_updates(grads: list[torch.Tensor], betas, eps) -> list[torch.Tensor]:
    """Adam's bias-corrected update direction m_hat / (sqrt(v_hat) + eps) at each step,
    for a gradient sequence taken at a fixed point (the first steps' regime)."""
    b1, b2 = betas
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append((m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))
    return out


def grad_stats(g: torch.Tensor, eps: float) -> dict:
    a = g.abs().flatten()
    sample = a[torch.randperm(a.numel())[: 1 << 20]] if a.numel() > 1 << 20 else a
    q = torch.quantile(sample, torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99]))
    return {
        "n": a.numel(),
        "l2": float(a.norm()),
        "l1": float(a.sum()),
        "rms": float(a.pow(2).mean().sqrt()),
        "quantiles": dict(zip(["p01", "p10", "p50", "p90", "p99"], q.tolist())),
        "share_below_eps": float((a < eps).float().mean()),
        "share_below_10eps": float((a < 10 * eps).float().mean()),
    }


class Trainables:
    """A method's trainable parameters as one flat vector: read, and set to p0 - lr * u."""

    def __init__(self, method):
        self.params = list(method.trainable().values())
        self.p0 = torch.cat([p.detach().float().flatten() for p in self.params])

    def flat_grad(self) -> torch.Tensor:
        return torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten() for p in self.params]
        )

    @torch.no_grad()
    def step(self, lr: float, u: torch.Tensor) -> None:
        flat, off = self.p0 - lr * u, 0
        for p in self.params:
            p.copy_(flat[off : off + p.numel()].view_as(p).to(p.dtype))
            off += p.numel()


@torch.no_grad()
def weight_rms_move_per_lr(method, layout, params: Trainables, u: torch.Tensor, lr: float) -> float:
    """RMS over every target weight of (merged after one step of size lr along u - merged
    before) / lr, through the method's merge_source (W0 + delta)."""
    sq, n = 0.0, 0
    for t in layout.targets:
        _, merged = method.merge_source(f"{t.name}.weight")
        params.step(0.0, u)
        before = merged().double()
        params.step(lr, u)
        sq += float((merged().double() - before).pow(2).sum())
        n += before.numel()
    params.step(0.0, u)
    return math.sqrt(sq / n) / lr


@torch.no_grad()
def line_search(model, params: Trainables, u: torch.Tensor, lrs: list[float], held_out) -> list[dict]:
    """Loss on `held_out` after one step of size lr along the fixed update u."""
    model.eval()
    out = []
    for lr in lrs:
        params.step(lr, u)
        out.append({"lr": lr, "loss": sum(float(model(**b).loss) for b in held_out) / len(held_out)})
    params.step(0.0, u)
    model.train()
    return out


def analyse(cfg, batches, line_mults=()) -> dict:
    """One method entry (cfg.method) on the batches: gradient, first updates, movement."""
    from gpart_ds import methods
    from gpart_ds.model import load_model
    from gpart_ds.objective import TrainingModel
    from gpart_ds.targets import build_layout, normalize_patterns

    base, _ = load_model(cfg.model.path, torch.float32, None)
    layout = build_layout(base, normalize_patterns(cfg.method.target_modules))
    method = methods.create(cfg.method)
    model = TrainingModel(method.build(base, layout, torch.device("cpu")))
    model.train()
    auto = resolved_lr(cfg, layout.D)
    t0 = time.perf_counter()
    params = Trainables(method)
    gs = []
    for b in batches:
        model(**b).loss.backward()
        gs.append(params.flat_grad())
        for p in params.params:
            p.grad = None
    t = cfg.train
    us = adam_first_updates(gs, tuple(t.betas), t.adam_eps)
    held_out = batches[1:]
    ls = line_search(model, params, us[0], [auto * x for x in line_mults], held_out) if line_mults and held_out else []
    with torch.no_grad():
        model.eval()
        loss0 = sum(float(model(**b).loss) for b in held_out) / len(held_out) if ls else None
        model.train()
    return {
        "method": cfg.method.name,
        "label": method.label,
        "trainable_params": params.p0.numel(),
        "D": layout.D,
        "auto_lr": auto,
        "seconds": time.perf_counter() - t0,
        "held_out_loss_before": loss0,
        "line_search": ls,
        "grad_per_batch": [grad_stats(g, t.adam_eps) for g in gs],
        "grad_mean": grad_stats(torch.stack(gs).mean(0), t.adam_eps),
        "update1_mean_abs": float(us[0].abs().mean()),
        "update1_l2": float(us[0].norm()),
        "updates_mean_abs": [float(u.abs().mean()) for u in us],
        "loss_decrease_per_lr": float((gs[0] * us[0]).sum()),
        "weight_rms_move_per_lr": weight_rms_move_per_lr(method, layout, params, us[0], auto),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.bench.theta_grad",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", default="configs/smollm2_rt.yaml")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="method entries, name=METHOD[,key=value...]; the first is the reference",
    )
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument(
        "--reference-lr",
        type=float,
        default=None,
        help="the first entry's lr the others are matched to (default: its train.lr=auto)",
    )
    ap.add_argument(
        "--line-mults",
        type=float,
        nargs="*",
        default=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
        help="one-step line search: multiples of each method's train.lr=auto",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.batches < 1:
        raise ConfigError(f"--batches {args.batches}: must be >= 1")
    cfgs = [load_config(args.config, args.overrides + parse_method(spec) + ["train.lr=auto"]) for spec in args.methods]
    if args.json:  # checked before the work: it must not end in an error about its output
        from gpart_ds.fileio import folder_problem

        parent = Path(args.json).parent
        problem = folder_problem(parent) or (not parent.is_dir() and f"its folder {str(parent)!r} does not exist")
        if problem:
            raise ConfigError(f"--json {args.json}: {problem}")
    torch.manual_seed(cfgs[0].train.seed)
    batches = _batches(cfgs[0], args.batches)
    res = {
        "config": args.config,
        "overrides": args.overrides,
        "batches": args.batches,
        "eps": cfgs[0].train.adam_eps,
        "betas": list(cfgs[0].train.betas),
        "methods": [],
    }
    for cfg in cfgs:
        res["methods"].append(analyse(cfg, batches, args.line_mults))
    ref = res["methods"][0]
    ref_lr = args.reference_lr or ref["auto_lr"]
    res["reference"] = {"method": ref["label"], "lr": ref_lr}
    for r in res["methods"][1:]:  # the lr whose first step matches the reference's
        r["lr_matching_reference_loss_decrease"] = ref_lr * ref["loss_decrease_per_lr"] / r["loss_decrease_per_lr"]
        r["lr_matching_reference_weight_move"] = ref_lr * ref["weight_rms_move_per_lr"] / r["weight_rms_move_per_lr"]
    for r in res["methods"]:
        q, g = r["grad_per_batch"][0]["quantiles"], r["grad_per_batch"][0]
        match = (
            f"  lr matching {ref['label']}@{ref_lr:.3g}: {r['lr_matching_reference_loss_decrease']:.3g} (loss), "
            f"{r['lr_matching_reference_weight_move']:.3g} (weights)"
            if r is not ref
            else ""
        )
        print(
            f"{r['label']:18s} |g| p10 {q['p10']:.2e} p50 {q['p50']:.2e} p90 {q['p90']:.2e}  ||g||2 {g['l2']:.3g}  "
            f"below eps {100 * g['share_below_eps']:.2f}%  |u1| {r['update1_mean_abs']:.3f}  "
            f"g.u/lr {r['loss_decrease_per_lr']:.3g}  rms dW/lr {r['weight_rms_move_per_lr']:.3g}  "
            f"auto lr {r['auto_lr']:.3g}" + match,
            flush=True,
        )
    for r in res["methods"]:
        if r["line_search"]:
            best = min(r["line_search"], key=lambda x: x["loss"])
            print(
                f"{r['label']:18s} one step, held-out loss {r['held_out_loss_before']:.4f} -> "
                + ", ".join(f"{x['lr']:.3g}: {x['loss']:.4f}" for x in r["line_search"])
                + f"   best lr {best['lr']:.3g}",
                flush=True,
            )
    if args.json:
        from gpart_ds.fileio import write_atomic

        write_atomic(args.json, json.dumps(res, indent=1) + "\n")
    return res


def cli(argv=None) -> int:
    """`python -m experiments.bench.theta_grad`: bad input as `error: ...`, exit 2."""
    from gpart_ds.errors import run_cli

    return run_cli(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
