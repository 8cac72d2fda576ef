"""The training loop: wires config, data, the sharded model, GPart and the DeepSpeed engine.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=5"])
    Trainer(cfg).run()

Every rank runs the same code; rank 0 alone writes files. The frozen model is loaded
sharded (ZeRO-3), the method (GPart, or a baseline: methods.py) is applied before
`deepspeed.initialize`; with GPart the only trainable parameter is theta, whose
gradient DeepSpeed reduces across ranks.
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
from . import assets, checkpoint, data, distributed, evaluate, methods, zero3
from . import commcount, frozen_shards, topology   # scale (issue 16)
from .config import check_paths, to_yaml, where_for
from .metrics import MetricsLog, format_step, peak_memory_gb
from .hub import display_name
from .model import check_targets, load_model, training_dtype
from .transform import GPartModel

log = logging.getLogger("gpart_ds")

# Exit status after a checkpoint written on SIGTERM / SIGUSR1 (EX_TEMPFAIL): "requeue me".
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the entry point exits 75."""


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
        self.gmodel: GPartModel | None = None   # the root module when method.name is gpart
        self.method: methods.Method | None = None

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        for recipe in cfg.prepare:
            assets.ensure(recipe)
        check_paths(cfg)
        self.layout = check_targets(cfg)  # before any weight is read
        # Read, validate and tokenise the data before any process group exists: a bad
        # line fails every rank at once, and ranks that wait for the shared tokenised
        # cache wait on a file lock, not inside a collective with a timeout.
        self._load_data()
        if commcount.enabled(cfg.dist.count_comm):   # scale (issue 16): before DeepSpeed binds the collectives
            commcount.install()
        ranks = distributed.init(cfg.dist.backend, cfg.dist.timeout_minutes)
        self.rank, self.local_rank, self.world = ranks.rank, ranks.local_rank, ranks.world
        # scale (issue 16): the nodes, and the group of ranks the frozen base is partitioned over
        self.topology = topology.discover()
        self.placement, self.frozen_group = frozen_shards.groups_for(
            cfg.dist, cfg.method.name, self.topology, self.rank, cfg.dist.timeout_minutes)
        _configure_logging(self.rank)
        log.info("ranks from %s: world %d, %d on this node, master %s:%d", ranks.source, ranks.world,
                 ranks.local_world, ranks.master_addr, ranks.master_port)
        self.device = distributed.device()
        self.dtype = training_dtype(cfg.model.precision, self.device.type)
        self.out = Path(cfg.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run_config.yaml").write_text(to_yaml(cfg))
        torch.manual_seed(cfg.train.seed)

        t = cfg.train
        self.ds_config = zero3.engine_config(
            OmegaConf.to_container(cfg.deepspeed, resolve=True), micro_batch=t.micro_batch_size,
            grad_accum=t.grad_accum, world=self.world, max_grad_norm=t.max_grad_norm, dtype=self.dtype)
        self.order = data.GlobalBatchOrder(len(self.train_set), t.micro_batch_size, t.grad_accum,
                                           self.world, t.seed)
        self._build_model()
        self._build_engine()
        self.metrics = MetricsLog(self.out / "metrics.jsonl" if self.rank == 0 else None)

    def _load_data(self) -> None:
        from transformers import AutoTokenizer

        cfg, d = self.cfg, self.cfg.data
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        common = dict(fmt=d.format, max_length=d.max_length, chat_template=d.chat_template,
                      add_eos=d.add_eos, cache_dir=d.cache_dir)
        self.train_set = data.tokenized(d.train, self.tokenizer, cfg.model.path, packing=d.packing,
                                        choice_loss=cfg.train.objective == "choices", **common)
        self.eval_set = data.tokenized(d.eval, self.tokenizer, cfg.model.path, packing=False, **common)
        eval_records, _ = data.load(d.eval, d.format)
        self.choice_items = evaluate.choice_items(eval_records, self.tokenizer, d.chat_template)
        self.eval_from_choices = evaluate.label_is_the_answer_choice(self.eval_set, self.choice_items)

    def _build_model(self) -> None:
        cfg, m = self.cfg, self.cfg.method
        if self.placement.is_world:
            base, self._ds_keepalive = load_model(cfg.model.path, self.dtype, self.ds_config)
        else:   # scale (issue 16): partitioned within the group, read shard-locally
            base, self._ds_keepalive = frozen_shards.build_partitioned(cfg.model.path, self.dtype, self.ds_config,
                                                                       self.frozen_group)
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
        self.method = methods.build(m, base, kernel_mode=kernel, count_device=self.device)
        self.gmodel = self.method.root if m.name == "gpart" else None
        extra = ""
        if m.name == "gpart":
            extra = f", kernels={kernel}, reuse_ids={self.gmodel.gpart_ctx.op.reuse_ids}"
        log.info("%s; world=%d%s", self.method.describe(), self.world, extra)

    def _build_engine(self) -> None:
        import deepspeed

        t = self.cfg.train
        params = list(self.method.trainable().values())
        opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        warmup = int(round(t.warmup_ratio * t.max_steps))

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_lambda(s, t.max_steps, warmup, t.schedule, t.min_lr_ratio))

        if not self.placement.is_world:   # scale (issue 16): trainables partitioned over the world
            frozen_shards.partition_trainables_over_world(self.method.root, self.ds_config)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.method.root, optimizer=opt, lr_scheduler=scheduler, config=self.ds_config)
        if self.gmodel is not None:
            zero3.persist(self.gmodel.gpart_theta)

    # ---------------------------------------------------------------- loop
    def _batch(self, indices: list[int], examples) -> tuple[dict, int]:
        exs = [examples[i] for i in indices]
        batch = data.collate(exs, self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}, data.count_tokens(exs)

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def train_step(self, step: int) -> dict:
        commcount.phase(f"step {step + 1}")   # scale (issue 16): no-op unless counting
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        loss_sum, tokens = 0.0, 0
        for a in range(self.cfg.train.grad_accum):
            batch, n_tokens = self._batch(self.order.indices(step, a, self.rank), self.train_set)
            loss = self.engine(**batch).loss
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.item()
            tokens += n_tokens
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        loss_total, tok_total = self._all_sum([loss_sum, tokens])
        n_micro = self.cfg.train.grad_accum * self.world
        return {"step": step + 1, "loss": loss_total / n_micro, "lr": lr,
                "step_time_s": dt, "tokens": int(tok_total), "tokens_per_s": tok_total / dt,
                "epoch": self.order.epoch_of(step + 1)}

    def _eval_limit(self, n: int) -> int:
        limit = self.cfg.train.eval_examples  # the same subset whatever the world size
        return min(n, limit) if limit else n

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss per predicted eval token and, for records with choices, accuracy.

        Every rank takes part in every forward (ZeRO-3 gathers weights collectively);
        ranks with nothing left run a dummy batch that is given weight 0.
        """
        commcount.phase("eval")   # scale (issue 16)
        self.engine.eval()
        mb = self.cfg.train.eval_micro_batch_size or self.cfg.train.micro_batch_size
        loss_sum, n_tok, matched, n_ex = 0.0, 0, 0, 0
        if not self.eval_from_choices:
            for idx in data.shard_evenly(self._eval_limit(len(self.eval_set)), mb, self.world, self.rank):
                s, n, em, ne = evaluate.loss_and_match_sums(self.engine, self.eval_set, idx or [0],
                                                            self.pad_id, self.device)
                if idx:
                    loss_sum, n_tok, matched, n_ex = loss_sum + s, n_tok + n, matched + em, n_ex + ne
        hits, scored = 0, 0
        items = self.choice_items[: self._eval_limit(len(self.choice_items))]
        logits = lambda **b: self.engine(**b).logits  # noqa: E731
        for idx in data.shard_evenly(len(items), mb, self.world, self.rank):
            chunk = [items[i] for i in (idx or [0])]
            if self.eval_from_choices:   # loss and exact match from the same forward
                scores, s, em = evaluate.score_items_with_label(logits, chunk, self.pad_id, self.device)
                if idx:   # one predicted token per record
                    loss_sum, n_tok, matched, n_ex = loss_sum + s, n_tok + len(chunk), matched + em, n_ex + len(chunk)
            else:
                scores = evaluate.score_items(logits, chunk, self.pad_id, self.device)
            ok = evaluate.correct(scores, chunk)
            if idx:
                hits, scored = hits + sum(ok), scored + len(ok)
        self.engine.train()
        loss_total, tok_total, hit_total, score_total, em_total, ex_total = self._all_sum(
            [loss_sum, n_tok, hits, scored, matched, n_ex])
        # exact_match: the whole completion is the greedy continuation of its prompt.
        out = {"eval_loss": loss_total / max(1.0, tok_total), "exact_match": em_total / max(1.0, ex_total)}
        if score_total:
            out["accuracy"] = hit_total / score_total
        return out

    def _checkpoint_root(self) -> Path:
        return Path(self.cfg.checkpoint.dir) if self.cfg.checkpoint.dir else self.out / "checkpoints"

    def _resume(self) -> tuple[int, dict | None]:
        """(first step to run, eval results before training) from a checkpoint, if asked."""
        import yaml

        want = self.cfg.train.resume
        if not want:
            return 0, None
        if want == "auto":
            ckpt = checkpoint.find_resume(self._checkpoint_root())
            if ckpt is None:
                log.info("resume=auto: no complete checkpoint in %s, starting fresh", self._checkpoint_root())
                return 0, None
        else:
            ckpt = Path(want)
            checkpoint.verify(ckpt)
        saved = yaml.safe_load((ckpt / "run_config.yaml").read_text())
        checkpoint.check_drift(saved, self.cfg, where_for(self.cfg))
        state = checkpoint.load(self.engine, self.method.trainable(), ckpt)
        log.info("resumed from %s at step %d (saved by %d ranks, now %d)", ckpt, state["step"],
                 state["world"], self.world)
        self.metrics.write({"event": "resume", "from": str(ckpt), "step": state["step"]})
        return state["step"], state.get("before")

    def save_checkpoint(self, step: int, before: dict) -> Path:
        commcount.phase("checkpoint")   # scale (issue 16)
        return checkpoint.save(self.engine, self.method.trainable(), self._checkpoint_root(), step,
                               {"before": before}, to_yaml(self.cfg), self.cfg.checkpoint.keep_last)

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption) ask the
        loop to stop after the current step; the flag is agreed on by all ranks."""
        import signal

        self._stop_signal = None

        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run(self) -> dict:
        if self.engine is None:
            self.setup()
        cfg, t = self.cfg, self.cfg.train
        self._install_signal_handlers()
        t_start = time.perf_counter()
        start, before = self._resume()
        if before is None:
            before = self.evaluate()
            self.metrics.write({"event": "eval", "step": 0, **before})
            log.info("before training: %s", _fmt(before))
        bar = None
        if self.rank == 0:
            from tqdm import tqdm

            # disable=None: no bar when stdout is not a terminal (logs keep the step lines)
            bar = tqdm(total=t.max_steps, initial=start, desc=cfg.method.name, dynamic_ncols=True, disable=None)
        history = []
        every = cfg.checkpoint.every_steps
        for step in range(start, t.max_steps):
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
                mid = self.evaluate()
                self.metrics.write({"event": "eval", "step": step + 1, **mid})
                log.info("step %d: %s", step + 1, _fmt(mid))
            if self._stop_requested() and step + 1 < t.max_steps:
                path = self.save_checkpoint(step + 1, before)
                self.metrics.write({"event": "preempted", "step": step + 1, "checkpoint": str(path)})
                log.warning("stop signal received: checkpoint %s written; exiting with %d so that a "
                            "requeued job resumes (train.resume=auto)", path, PREEMPTED_EXIT)
                if bar is not None:
                    bar.close()
                self.metrics.close()
                raise Preempted(str(path))
            if every and (step + 1) % every == 0 and step + 1 < t.max_steps:
                self.save_checkpoint(step + 1, before)
        if bar is not None:
            bar.close()
        commcount.phase("summary")   # scale (issue 16)
        # Peak memory of training itself, before the gathers of checkpoint and export.
        train_mem = {f"train_{k}": v for k, v in self._max_over_ranks(peak_memory_gb()).items()}
        model_state = zero3.model_state_bytes(self.engine)   # optimizer state exists after a step
        self.save_checkpoint(t.max_steps, before)
        after = self.evaluate()
        self.metrics.write({"event": "eval", "step": t.max_steps, **after})
        wall = time.perf_counter() - t_start
        commcount.phase("adapter")   # scale (issue 16)
        adapter_dir = self.save_adapter_all(self.out / "adapter")
        if self.world > 1:
            dist.barrier()
        if cfg.export.merged:
            self.export_merged()
        commcount.phase("summary")   # scale (issue 16)
        mem = self._max_over_ranks(peak_memory_gb())
        steady = [r["step_time_s"] for r in history[1:]] or [r["step_time_s"] for r in history] or [0.0]
        summary = {"event": "summary", "method": cfg.method.name, "steps": t.max_steps, "world": self.world,
                   "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
                   "accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
                   "exact_match_before": before.get("exact_match"), "exact_match_after": after.get("exact_match"),
                   "final_loss": history[-1]["loss"] if history else None, "wall_s": wall,
                   "median_step_time_s": sorted(steady)[len(steady) // 2],
                   "trainable_params": self.method.trainable_params(),
                   "adapter_bytes": _folder_bytes(adapter_dir),
                   "checkpoint_bytes": _folder_bytes(checkpoint.step_dir(self._checkpoint_root(), t.max_steps)),
                   "model_state_bytes": model_state, **train_mem, **mem}
        summary.update(self._comm_report())   # scale (issue 16): {} unless counting
        self.metrics.write(summary)
        self.metrics.close()
        if self.rank == 0:
            print(summary_table(summary, adapter_dir), flush=True)
        return summary

    # ---------------------------------------------------------------- outputs
    def export_merged(self) -> Path:
        """The merged Hugging Face folder, every rank writing its own shards (collective)."""
        from .config import export_dir
        from .export import parse_dtype
        from .zero3_export import export_merged

        from .zero3_export import export_gathered

        e, t0 = self.cfg.export, time.perf_counter()
        commcount.phase("export")   # scale (issue 16)
        if self.gmodel is not None:
            out = export_merged(self.gmodel, self.cfg.model.path, export_dir(self.cfg), self.dtype,
                                parse_dtype(e.dtype), e.max_shard_size, e.overwrite, device=self.device,
                                replica=(self.placement.replica, self.placement.replicas))
        else:
            out = export_gathered(self.method, self.cfg.model.path, export_dir(self.cfg), self.dtype,
                                  parse_dtype(e.dtype), e.max_shard_size, e.overwrite, device=self.device)
        dt = time.perf_counter() - t0
        log.info("merged model written to %s in %.1f s", out, dt)
        self.metrics.write({"event": "export", "dir": str(out), "seconds": dt})
        return out

    def export_only(self) -> Path:
        """Load a checkpoint (train.resume) and write the merged model; no training."""
        if self.engine is None:
            self.setup()
        if not self.cfg.train.resume:
            raise checkpoint.CheckpointError(
                f"{where_for(self.cfg)('train.resume')}: --export-only needs train.resume=auto or a checkpoint path")
        step, _ = self._resume()
        if step == 0:
            raise checkpoint.CheckpointError(f"no complete checkpoint in {self._checkpoint_root()} to export")
        out = self.export_merged()
        self.metrics.close()
        return out

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

    def _comm_report(self) -> dict:
        """scale (issue 16): with dist.count_comm, each rank writes its collective counts to
        <output_dir>/comm/comm-rank<r>.json; the summary gets rank 0's bytes per step."""
        path = commcount.dump(self.out / "comm", self.rank, self.topology.to_json(),
                              {"frozen_groups": [list(g) for g in self.placement.groups]})
        if path is None:
            return {}
        if self.world > 1:
            dist.barrier()
        per_phase = commcount.summarize(commcount.load(self.out / "comm")[0])
        steps = commcount.step_phases(per_phase)
        last = per_phase[steps[-1]] if steps else {"intra": 0.0, "inter": 0.0}
        return {"comm_dir": str(self.out / "comm"), "comm_inter_node_bytes_last_step": last["inter"],
                "comm_intra_node_bytes_last_step": last["intra"]}

    def _max_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(keys, t.tolist()))

    def save_adapter_all(self, out_dir: Path) -> Path | None:
        """Collective: the method's adapter folder, written by rank 0 (None: full FT)."""
        if self.gmodel is None:
            info = {"name": display_name(self.cfg.model.path), "path": str(Path(self.cfg.model.path).resolve())}
            self.method.save_adapter(out_dir, self.rank, info)
            return None if self.method.name == "full" else out_dir
        theta = self.theta()
        self.check_replicas(theta)
        if self.rank == 0:
            self.save_adapter(theta, out_dir)
        return out_dir

    def save_adapter(self, theta: torch.Tensor, out_dir: Path) -> Path:
        m = self.cfg.method
        tm = m.target_modules if isinstance(m.target_modules, str) else list(m.target_modules)
        config = adapter_io.adapter_config(
            d=m.d, seed=m.seed, target_modules=tm, dropout=m.dropout, layout=self.gmodel.layout,
            base_model={"name": display_name(self.cfg.model.path),
                        "path": str(Path(self.cfg.model.path).resolve()),
                        "architectures": list(getattr(self.gmodel.base_model.config, "architectures", None) or [])},
            dtype=self.dtype)
        return adapter_io.save_adapter(out_dir, theta, config)


def _folder_bytes(folder: Path | None) -> int:
    if folder is None or not Path(folder).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def summary_table(s: dict, adapter_dir: Path) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    rows = [("eval loss", f"{s['eval_loss_before']:.4f}", f"{s['eval_loss_after']:.4f}"),
            ("accuracy", pct(s["accuracy_before"]), pct(s["accuracy_after"])),
            ("exact match", pct(s.get("exact_match_before")), pct(s.get("exact_match_after")))]
    lines = ["", "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    adapter = (f"adapter on disk: {s['adapter_bytes'] / 1024:.1f} KiB ({adapter_dir})" if adapter_dir
               else "no adapter (full fine-tuning: export.merged writes the model)")
    lines += ["", f"method: {s['method']}   trainable parameters: {s['trainable_params']:,}   {adapter}",
              f"ranks: {s['world']}   steps: {s['steps']}   median step: {s['median_step_time_s']:.2f} s   "
              f"wall time (eval + train): {s['wall_s'] / 60:.1f} min   "
              f"peak memory per rank: {s.get('peak_gpu_gb', s['peak_rss_gb']):.2f} GB", ""]
    return "\n".join(lines)


def main(cfg: DictConfig) -> dict:
    return Trainer(cfg).run()
