"""The training loop: wires config, data, the sharded model, GPart and the DeepSpeed engine.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=5"])
    Trainer(cfg).run()

Every rank runs the same code; rank 0 alone writes files. The frozen model is loaded
sharded (ZeRO-3), GPart is applied before `deepspeed.initialize`, and the only
trainable parameter is theta, whose gradient DeepSpeed reduces across ranks.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from . import adapter as adapter_io
from . import assets, data, distributed, zero3
from .config import check_paths, to_yaml
from .metrics import MetricsLog, format_step, peak_memory_gb
from .model import check_targets, load_model, model_name, training_dtype
from .transform import GPartModel, apply_gpart

log = logging.getLogger("gpart_ds")

# Below this many target weights the compile time of the fused kernels (seconds) is
# larger than what they save; eager kernels run tiny test models faster.
COMPILE_MIN_D = 1 << 24


def lr_lambda(step: int, max_steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s", force=True)


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.engine = None
        self.gmodel: GPartModel | None = None

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.prepare:
            assets.ensure(cfg.prepare)
        check_paths(cfg)
        self.layout = check_targets(cfg)  # before any weight is read
        # Read (and so validate) the data before any process group exists: a bad line
        # fails every rank at once instead of leaving peers waiting on a collective.
        self.records = {k: data.read_jsonl(cfg.data[k]) for k in ("train", "eval")}
        self.rank, self.local_rank, self.world = distributed.init(cfg.dist.backend, cfg.dist.timeout_minutes)
        _configure_logging(self.rank)
        self.device = distributed.device()
        self.dtype = training_dtype(cfg.model.precision, self.device.type)
        self.out = Path(cfg.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run_config.yaml").write_text(to_yaml(cfg))
        torch.manual_seed(cfg.train.seed)

        t = cfg.train
        self.ds_config = zero3.engine_config(
            OmegaConf.to_container(cfg.deepspeed, resolve=True), micro_batch=t.micro_batch_size, grad_accum=t.grad_accum,
            world=self.world, max_grad_norm=t.max_grad_norm, dtype=self.dtype)
        self._load_data()
        self._build_model()
        self._build_engine()
        self.metrics = MetricsLog(self.out / "metrics.jsonl" if self.rank == 0 else None)

    def _load_data(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.train_set = data.tokenize(self.records["train"], self.tokenizer, cfg.data.max_length)
        self.eval_set = data.tokenize(self.records["eval"], self.tokenizer, cfg.data.max_length)
        t = cfg.train
        self.order = data.GlobalBatchOrder(len(self.train_set), t.micro_batch_size, t.grad_accum,
                                           self.world, t.seed)

    def _build_model(self) -> None:
        cfg, m = self.cfg, self.cfg.method
        base, self._ds_keepalive = load_model(cfg.model.path, self.dtype, self.ds_config)
        for name, p in base.named_parameters():
            bad = zero3.unsupported_variant(p)
            if bad:
                raise RuntimeError(f"parameter {name}: {bad} is not supported by gpart_ds")
        if cfg.model.gradient_checkpointing:
            # Non-reentrant: reentrant checkpointing sees the shared theta twice per
            # bucket under ZeRO-3 and fails.
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kernel = m.kernel
        if kernel == "auto":
            kernel = "compiled" if (self.device.type == "cuda" or self.layout.D >= COMPILE_MIN_D) else "eager"
        tm = m.target_modules if isinstance(m.target_modules, str) else list(m.target_modules)
        self.gmodel = apply_gpart(base, d=m.d, seed=m.seed, target_modules=tm, dropout=m.dropout,
                                  kernel_mode=kernel, chunk_elems=m.chunk_elems,
                                  count_device=self.device)
        log.info("GPart: D=%d target weights in %d matrices, d=%d (D/d=%.0f), kernels=%s, world=%d",
                 self.layout.D, len(self.layout.targets), m.d, self.layout.D / m.d, kernel, self.world)

    def _build_engine(self) -> None:
        import deepspeed

        t = self.cfg.train
        theta = self.gmodel.gpart_theta
        opt = torch.optim.AdamW([theta], lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        warmup = int(round(t.warmup_ratio * t.max_steps))

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_lambda(s, t.max_steps, warmup, t.schedule, t.min_lr_ratio))

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.gmodel, optimizer=opt, lr_scheduler=scheduler, config=self.ds_config)
        zero3.persist(theta)

    # ---------------------------------------------------------------- loop
    def _batch(self, indices: list[int], examples) -> dict:
        batch = data.collate([examples[i] for i in indices], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        loss_sum, tokens = 0.0, 0
        for a in range(self.cfg.train.grad_accum):
            batch = self._batch(self.order.indices(step, a, self.rank), self.train_set)
            loss = self.engine(**batch).loss
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        loss_total, tok_total = self._all_sum([loss_sum, tokens])
        n_micro = self.cfg.train.grad_accum * self.world
        return {"step": step + 1, "loss": loss_total / n_micro, "lr": lr,
                "step_time_s": dt, "tokens": int(tok_total), "tokens_per_s": tok_total / dt,
                "epoch": self.order.epoch_of(step + 1)}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per completion token over the eval set (all ranks take part)."""
        self.engine.eval()
        loss_sum, n_tok = 0.0, 0
        mb = self.cfg.train.micro_batch_size
        n = len(self.eval_set)
        if self.cfg.train.eval_batches:  # the same subset whatever the world size
            n = min(n, self.cfg.train.eval_batches * mb)
        for idx in data.eval_batches(n, mb, self.world, self.rank):
            weight = 1.0 if idx else 0.0
            batch = self._batch(idx or [0], self.eval_set)  # ZeRO-3: every rank must forward
            out = self.engine(**batch)
            n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
            loss_sum += weight * out.loss.item() * n
            n_tok += int(weight * n)
        self.engine.train()
        total, count = self._all_sum([loss_sum, n_tok])
        return total / max(1.0, count)

    def run(self) -> dict:
        if self.engine is None:
            self.setup()
        cfg, t = self.cfg, self.cfg.train
        bar = None
        if self.rank == 0:
            from tqdm import tqdm

            # disable=None: no bar when stdout is not a terminal (logs keep the step lines)
            bar = tqdm(total=t.max_steps, desc="gpart", dynamic_ncols=True, disable=None)
        eval_loss0 = self.evaluate()
        self.metrics.write({"event": "eval", "step": 0, "eval_loss": eval_loss0})
        log.info("eval loss before training: %.4f", eval_loss0)
        history, eval_loss, t_start = [], eval_loss0, time.perf_counter()
        for step in range(t.max_steps):
            rec = self.train_step(step)
            rec.update(peak_memory_gb())
            history.append(rec)
            self.metrics.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if (step + 1) % t.log_every == 0:
                    bar.write(format_step(rec, t.max_steps))
            if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.max_steps:
                eval_loss = self.evaluate()
                self.metrics.write({"event": "eval", "step": step + 1, "eval_loss": eval_loss})
        if bar is not None:
            bar.close()
        eval_loss = self.evaluate()
        self.metrics.write({"event": "eval", "step": t.max_steps, "eval_loss": eval_loss})
        wall = time.perf_counter() - t_start
        theta = self.theta()
        self.check_replicas(theta)
        if self.rank == 0:
            self.save_adapter(theta, self.out / "adapter")
        if self.world > 1:
            dist.barrier()
        mem = self._max_over_ranks(peak_memory_gb())
        steady = [r["step_time_s"] for r in history[1:]] or [history[-1]["step_time_s"]]
        summary = {"event": "summary", "steps": t.max_steps, "world": self.world,
                   "eval_loss_before": eval_loss0, "eval_loss_after": eval_loss,
                   "final_loss": history[-1]["loss"], "train_wall_s": wall,
                   "median_step_time_s": sorted(steady)[len(steady) // 2],
                   "trainable_params": int(theta.numel()), **mem}
        self.metrics.write(summary)
        self.metrics.close()
        log.info("done: eval loss %.4f -> %.4f, median step %.3fs, peak %s; adapter in %s",
                 eval_loss0, eval_loss, summary["median_step_time_s"], mem, self.out / "adapter")
        return summary

    # ---------------------------------------------------------------- outputs
    def theta(self) -> torch.Tensor:
        """The full theta on this rank (fp32, CPU)."""
        theta = self.gmodel.gpart_theta
        with zero3.gathered([theta]):
            return theta.detach().float().cpu().clone()

    def check_replicas(self, theta: torch.Tensor) -> None:
        """theta must be bit-identical on every rank; a divergence is a bug, fail loudly."""
        if self.world == 1:
            return
        digest = int.from_bytes(hashlib.sha256(theta.numpy().tobytes()).digest()[:7], "little")
        mine = torch.tensor([digest], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        if len({int(x) for x in every}) != 1:
            raise RuntimeError(f"theta differs between ranks: digests {[int(x) for x in every]}")

    def _max_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(keys, t.tolist()))

    def save_adapter(self, theta: torch.Tensor, out_dir: Path) -> Path:
        m = self.cfg.method
        tm = m.target_modules if isinstance(m.target_modules, str) else list(m.target_modules)
        config = adapter_io.adapter_config(
            d=m.d, seed=m.seed, target_modules=tm, dropout=m.dropout, layout=self.gmodel.layout,
            base_model={"name": model_name(self.cfg.model.path),
                        "path": str(Path(self.cfg.model.path).resolve()),
                        "architectures": list(getattr(self.gmodel.base_model.config, "architectures", None) or [])})
        return adapter_io.save_adapter(out_dir, theta, config)


def main(cfg: DictConfig) -> dict:
    return Trainer(cfg).run()
