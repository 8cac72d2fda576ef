"""The training loop: wires config, data, the sharded model, the method and the engine.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=5"])
    with Trainer(cfg) as trainer:   # destroys the process groups where every rank ends together
        trainer.run()

Every rank runs the same code; rank 0 alone writes files. The frozen model is loaded
sharded (ZeRO-3), the method (methods/: GPart or a baseline) adapts it before
`deepspeed.initialize`, and the training objective wraps whatever root the method
returns. Nothing here depends on which method runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import (
    checkpoint,
    comm,
    commcount,
    data,
    distributed,
    evaluate,
    frozen_shards,
    ft,
    generation,
    methods,
    ownership,
    runcheck,
    zero3,
)
from .config import ConfigError, check_paths, export_dir, need_for, to_yaml, unread_method_keys, where_for
from .errors import EXIT_PREEMPTED, RunFailed, UserError
from .fileio import folder_bytes, write_atomic
from .hub import display_name
from .metrics import MetricsLog, Progress, answer_fell, peak_memory_gb, summary_table
from .model import check_weights, enable_activation_checkpointing, training_dtype
from .objective import TrainingModel, trains_on_choices

log = logging.getLogger("gpart_ds")

PREEMPTED_EXIT = EXIT_PREEMPTED


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the entry point exits 75."""


class NonFiniteError(UserError):
    """The loss, the gradient norm or the trained state stopped being finite: training
    stops on every rank (they agree through one collective) and keeps the last good
    checkpoint; exit 2 (the input, usually train.lr or the base weights, needs a change)."""


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
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s",
        force=True,
    )


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.engine = None
        self.method: methods.Method | None = None
        self._export_only = False
        self._locks: list[ownership.FolderLock] = []  # rank 0's: the folders this run owns
        # dist.fault_tolerance=nodes: this node's torchft replica (ft.py); None otherwise
        self.replicas: ft.Replicas | None = None
        self._stop_signal: int | None = None  # set by the training loop's signal handler

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        cfg = self.cfg
        # Every check before the first write, in one order (runcheck): the config against
        # the model and DeepSpeed, then the output folder and the resume target. Each rank
        # decides alone from the same files, so a refusal is the same everywhere.
        _configure_logging(int(os.environ.get("RANK", "0") or 0))
        check_paths(cfg)
        # Fault tolerance across nodes: torchft, the lighthouse and this node's replica
        # group are named before anything is read (ft.place).
        self.ft_place = ft.place() if _ft_mode(cfg) else None
        if self.ft_place is not None and not cfg.train.resume:
            # the replica groups share output_dir: a group that starts after another (or
            # restarts) continues the run there instead of refusing its files
            cfg.train.resume = "auto"
        checked = runcheck.validate_for_run(
            cfg,
            world=distributed.check_launch_env(),
            device_type="cuda" if torch.cuda.is_available() else "cpu",
            environment=True,
        )
        self.layout, self.lr = checked.layout, checked.lr
        # A live run that owns these folders is named before anything else is said about
        # them (every rank looks at the same lock files; rank 0 takes them below).
        for lock in self._owned_folders():
            ownership.peek(lock.path, lock.what, lock.key)
        before = _folder_state(cfg)
        self.outputs = runcheck.resolve_outputs(cfg, export_only=self._export_only)
        try:  # a renamed key would otherwise load as random values, without a word
            check_weights(cfg.model.path)
        except UserError as exc:
            raise ConfigError(f"{where_for(cfg)('model.path')}: {exc}") from None
        # Read, validate and tokenise the data before any process group exists: a bad
        # line fails every rank at once, and ranks that wait for the shared tokenised
        # cache wait on a file lock, not inside a collective with a timeout.
        self._load_data()
        # The counter wraps torch.distributed's collectives, so it must be in place before
        # DeepSpeed binds some of them when its backend starts.
        if commcount.enabled(cfg.dist.count_comm):
            commcount.install()
        ranks = distributed.init(cfg.dist.backend, cfg.dist.timeout_minutes)
        self.rank, self.local_rank, self.world = ranks.rank, ranks.local_rank, ranks.world
        _configure_logging(self.rank)
        if self.ft_place is not None:  # right after the node's group: it heartbeats while the model loads
            self._start_replica(ranks)
        self._take_folders(before)
        # Which ranks share a node, and the groups the frozen base is partitioned over.
        self.placement = frozen_shards.place(
            cfg.dist, methods.get(cfg.method.name).trains_base, cfg.dist.timeout_minutes
        )
        log.info(
            "ranks from %s: world %d, %d on this node, master %s:%d",
            ranks.source,
            ranks.world,
            ranks.local_world,
            ranks.master_addr,
            ranks.master_port,
        )
        self.device = distributed.device()
        # What this machine must offer the method, before any weight is read.
        methods.create(cfg.method).check_environment(self.device, need_for(where_for(cfg)))
        self.dtype = training_dtype(cfg.model.precision, self.device.type)
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.train.seed)

        t = cfg.train
        self.ds_config = runcheck.deepspeed_config(cfg, self.world, self.dtype)
        # The data order spans every replica group (alive or not): a step's batch is a
        # function of the step and (replica, rank) alone, so a quorum that shrinks trains
        # the live replicas' shares of it and a healed replica picks up exactly its own.
        width = self.ft_place.count if self.ft_place is not None else 1
        self.data_rank = (self.ft_place.index if self.ft_place is not None else 0) * self.world + self.rank
        self.order = data.GlobalBatchOrder(
            len(self.train_set), t.micro_batch_size, t.grad_accum, self.world * width, t.seed
        )
        self._build_model()
        self._build_engine()
        if self.rank == 0:  # the first writes of the run
            runcheck.remove_earlier_results(self.outputs, cfg)
            self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(
            self.out if self.rank == 0 else None,
            cfg,
            tag={"replica": self.ft_place.index} if self.ft_place is not None else None,
        )

    def _owned_folders(self) -> list[ownership.FolderLock]:
        """The locks of what this run writes: output_dir; checkpoint.dir and the merged
        export's folder where they lie outside it (a folder inside output_dir is covered by
        its lock; the export, replaced as a whole, is locked beside itself, as every
        export is: export.zero3 takes that lock again, nested, when it writes)."""
        cfg = self.cfg
        out = Path(cfg.output_dir)
        if _ft_mode(cfg):
            # Replica groups share output_dir by design; torchft lets one of them (the first
            # participant) write checkpoints and exports at a time. Each node locks its own
            # folder of the run, so that a second copy of the same replica is refused.
            return [ownership.FolderLock.for_folder(out / "replicas" / f"replica{self.ft_place.index}", "output_dir")]
        locks = [ownership.FolderLock.for_folder(out, "output_dir")]
        inside = lambda p: Path(os.path.abspath(p)).is_relative_to(os.path.abspath(out))  # noqa: E731
        root = runcheck.checkpoint_root(cfg)
        if not inside(root):
            locks.append(ownership.FolderLock.for_folder(root, "checkpoint.dir"))
        if cfg.export.merged and not inside(export_dir(cfg)):
            locks.append(ownership.FolderLock.beside(export_dir(cfg), "export.dir"))
        return locks

    def _take_folders(self, before) -> None:
        """Rank 0 takes the output folders' locks before the run writes anything; every
        rank learns the verdict through one collective and refuses with the same words.
        The ranks cannot decide alone (rank 0's own lock would look like another run's to
        them), and before the process group exists they could not agree, so a refusal on
        rank 0 alone would leave the others to be killed by the launcher (SIGTERM: exit 75,
        and a SLURM job would requeue itself forever). If the folder changed between the
        checks (runcheck, above) and the lock (a run that ended in between), every rank
        checks it again, now that nobody else can write there."""
        verdict, changed = None, False
        if self.rank == 0:
            try:
                for lock in self._owned_folders():
                    self._locks.append(lock)  # listed first: an interrupt inside still gives it back
                    lock.acquire()
                changed = _folder_state(self.cfg) != before
            except ownership.FolderBusy as exc:
                verdict = str(exc)
                self._release_folders()
        verdict, changed = comm.gather_objects((verdict, changed))[0]
        if verdict is not None:
            raise ownership.FolderBusy(verdict)
        if changed:
            self.outputs = runcheck.resolve_outputs(self.cfg, export_only=self._export_only)

    def _release_folders(self) -> None:
        while self._locks:
            self._locks.pop().release()

    def _load_data(self) -> None:
        from transformers import AutoTokenizer

        cfg, d = self.cfg, self.cfg.data
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.train_set, self.eval_set = data.tokenized_sets(
            d, self.tokenizer, cfg.model.path, choice_loss=trains_on_choices(cfg.train.objective)
        )
        if not self.train_set.has_labels():
            raise data.DataError(
                f"{d.train}: no record has a token to learn from (every prompt fills "
                f"data.max_length={d.max_length}, or completions are empty with add_eos "
                "false); training would report loss 0 and change nothing"
            )
        self.evaluator = evaluate.Evaluator.for_files(
            self.eval_set, d.eval, d.format, self.tokenizer, d.chat_template, self.pad_id
        )

    def _build_model(self) -> None:
        cfg = self.cfg
        base, self._ds_keepalive = frozen_shards.load_base(cfg.model.path, self.dtype, self.ds_config, self.placement)
        for name, p in base.named_parameters():
            bad = zero3.unsupported_variant(p)
            if bad:
                raise RuntimeError(f"parameter {name}: {bad} is not supported by gpart_ds")
        if cfg.model.gradient_checkpointing:
            enable_activation_checkpointing(base)
        self.method = methods.create(cfg.method)
        self.model = TrainingModel(self.method.build(base, self.layout, self.device), cfg.train.objective)
        log.info(
            "%s; world=%d; lr %.3g%s",
            self.method.describe(),
            self.world,
            self.lr,
            " (train.lr=auto)" if cfg.train.lr == "auto" else "",
        )
        unread = unread_method_keys(cfg.method)
        if unread and self.rank == 0:  # one config fact: said once, not by every rank
            log.warning("not read by %s (ignored): %s", cfg.method.name, ", ".join(unread))

    def _build_engine(self) -> None:
        import deepspeed

        t = self.cfg.train
        params = list(self.method.trainable().values())
        opt = torch.optim.AdamW(params, lr=self.lr, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay)
        warmup = int(round(t.warmup_ratio * t.max_steps))

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_lambda(s, t.max_steps, warmup, t.schedule, t.min_lr_ratio)
            )

        frozen_shards.place_trainables(self.method.root, self.placement, self.ds_config)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=opt, lr_scheduler=scheduler, config=self.ds_config
        )
        self.method.after_engine()
        if self.replicas is not None:
            self.replicas.bind(self.engine, params, self.scheduler)

    def _start_replica(self, ranks) -> None:
        """This rank's torchft manager (ft.Replicas); the world must be one node."""
        from . import topology

        nodes = topology.discover().nodes
        if len(nodes) > 1:
            raise ft.FaultToleranceError(
                f"dist.fault_tolerance=nodes: this world spans {len(nodes)} nodes; each node must be its own world "
                "(its own MASTER_PORT: launch/sim_nodes.py --ft, slurm/gpart.sh with dist.fault_tolerance=nodes)"
            )
        self.replicas = ft.Replicas(
            self.ft_place,
            rank=ranks.rank,
            world=ranks.world,
            master_addr=ranks.master_addr,
            master_port=ranks.master_port,
            device=distributed.device(),
            max_retries=self.cfg.dist.ft_max_retries,
            quorum_timeout_s=self.cfg.dist.timeout_minutes * 60,
        )
        log.info(
            "fault tolerance: replica group %d of %d, lighthouse %s",
            self.ft_place.index,
            self.ft_place.count,
            self.ft_place.lighthouse,
        )

    def _replica_step(self) -> int:
        """The quorum of the next step (ft.Replicas.begin): its step, its cost in quorum_s."""
        t0 = time.perf_counter()
        step = self.replicas.begin()
        self._quorum_s = time.perf_counter() - t0
        return step

    def _writes_outputs(self) -> bool:
        """This rank writes the run's shared files: rank 0, of the writing replica group
        under fault tolerance (checkpoints, adapter, export, predictions)."""
        return self.rank == 0 and (self.replicas is None or self.replicas.is_writer())

    def _writer_node(self) -> bool:
        """This node writes checkpoints, the adapter and the export (all of its ranks take part)."""
        return self.replicas is None or self.replicas.is_writer()

    # ---------------------------------------------------------------- loop
    def _batch(self, indices: list[int], examples) -> tuple[dict, int]:
        exs = [examples[i] for i in indices]
        batch = data.collate(exs, self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}, data.count_tokens(exs)

    def train_step(self, step: int) -> dict:
        commcount.phase(f"step {step + 1}")
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
        loss_sum, tokens = 0.0, 0
        committed, members = True, None
        for a in range(self.cfg.train.grad_accum):
            batch, n_tokens = self._batch(self.order.indices(step, a, self.data_rank), self.train_set)
            loss = self.engine(**batch).loss
            self.engine.backward(loss)
            if self.replicas is not None:  # grad_accum is 1 (config): this is the boundary
                members = self.replicas.average()
                change = self.replicas.quorum_change(step + 1, members)
                if change is not None:
                    self.metrics.write(change)
                    log.warning(
                        "quorum at step %d: %d replica group(s) %s (before: %s)%s",
                        step + 1,
                        change["participants"],
                        members,
                        change["previous"],
                        "; this replica healed from a live one" if change["healed"] else "",
                    )
                committed = self.replicas.commit()
            if committed:
                self.engine.step()
            else:  # a participant failed in this step: its gradient is dropped, the step runs again
                self.engine.optimizer.zero_grad()
            loss_sum += loss.item()
            tokens += n_tokens
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        # One collective: the loss, the tokens, and how many ranks hold a non-finite piece
        # of the trained state, so every rank takes the same decision below.
        state_ok = self.method.state_finite()
        loss_total, tok_total, bad_ranks = comm.all_sum(
            [loss_sum, tokens, 0.0 if state_ok in (None, True) else 1.0], self.device
        )
        n_micro = self.cfg.train.grad_accum * self.world
        rec = {
            "step": step + 1,
            "loss": loss_total / n_micro,
            "lr": lr,
            "step_time_s": dt,
            "tokens": int(tok_total),
            "tokens_per_s": tok_total / dt,
            "epoch": self.order.epoch_of(step + 1),
        }
        if self.replicas is not None:
            rec.update(committed=committed, replicas=members, quorum_s=self._quorum_s)
            if not committed:
                return rec
            rec.update(self.replicas.digest())
        grad_norm = self.engine.get_global_grad_norm()
        self._check_finite(step + 1, rec["loss"], grad_norm, int(bad_ranks))
        return rec

    def _check_finite(self, step: int, loss: float, grad_norm, bad_ranks: int) -> None:
        """Stop on a non-finite loss, gradient norm (DeepSpeed skips such a step without a
        word) or trained state: nothing of this step is saved, the last checkpoint stays."""
        bad = []
        if not math.isfinite(loss):
            bad.append(f"loss {loss}")
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            bad.append(f"gradient norm {float(grad_norm)}")
        if bad_ranks:
            bad.append(f"trained parameters ({self.method.label}) on {bad_ranks} rank(s)")
        if not bad:
            return
        self.metrics.write({"event": "nonfinite", "step": step, "what": bad})
        self.metrics.close()
        latest = self._latest_checkpoint()
        raise NonFiniteError(
            f"step {step}: non-finite {', '.join(bad)} (NaN or inf); training stopped on every rank and this "
            f"step was not saved. Last good checkpoint: {latest or 'none (no checkpoint was written yet)'}. "
            f"Lower train.lr (now {self.lr:.3g}) or train.max_grad_norm, or check the base weights and data "
            "(a NaN in the base model gives a NaN loss from step 1)"
        )

    def _latest_checkpoint(self) -> str | None:
        latest = self._checkpoint_root() / checkpoint.LATEST
        try:
            return str(self._checkpoint_root() / latest.read_text().strip()) if latest.is_file() else None
        except OSError:
            return None

    @torch.no_grad()
    def evaluate(self, step: int, last: bool = False) -> dict:
        """Held-out loss, exact match and (records with choices) accuracy, on every rank.

        The evaluations during training score the first train.eval_examples_during records
        (0: train.eval_examples), the one before and the last train.eval_examples. Each
        record's verdict goes to eval_predictions.jsonl after the last evaluation and, with
        train.eval_predictions, to predictions/step-N.jsonl after every earlier one."""
        commcount.phase("eval")
        t = self.cfg.train
        during = 0 < step and not last
        limit = (t.eval_examples_during or t.eval_examples) if during else t.eval_examples
        preds = [] if last or t.eval_predictions else None
        answers = {}
        if t.eval_generate == "always" or (t.eval_generate == "final" and not during):
            root = self.model.root
            # ZeRO-3's hooks gather a module's own parameters as it runs. Not these, read by
            # code that never calls their module: the root's own (GPart's theta, read by
            # prepare()) and parameter containers (VeRA's lambda ParameterDicts). Both small.
            unhooked = list(root.parameters(recurse=False)) + [
                p
                for m in root.modules()
                if isinstance(m, (torch.nn.ParameterDict, torch.nn.ParameterList))
                for p in m.parameters(recurse=False)
            ]

            def generate(**kw):  # collective: every rank generates as often
                with zero3.gathered(unhooked):
                    return root.generate(**kw)

            answers = dict(
                generate=generate,
                eos=generation.stop_ids(root.lm, self.tokenizer),
                generate_batch=t.eval_generate_batch,
            )
        self.engine.eval()
        try:
            res = self.evaluator.run(
                self.engine,
                t.eval_micro_batch_size or t.micro_batch_size,
                limit,
                self.device,
                preds,
                stop=self._stop_requested,
                **answers,
            )
        finally:
            self.engine.train()
        if preds is not None and self._writes_outputs():  # per-record verdicts: paired tests, curves
            path = self.out / ("eval_predictions.jsonl" if last else f"predictions/step-{step:06d}.jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, "".join(json.dumps(p) + "\n" for p in preds))
        return res

    def _evaluate_during(self, step: int) -> bool:
        """The evaluation during training at `step`; False where a stop signal gave it up
        (the step's checkpoint then records it as due)."""
        try:
            mid = self.evaluate(step)
        except evaluate.Abandoned:
            log.warning("step %d: evaluation given up for the stop signal; a resume runs it first", step)
            return False
        self.metrics.write({"event": "eval", "step": step, **mid})
        log.info("step %d: %s", step, _fmt(mid))
        return True

    def _stopped_in_eval(self, step: int) -> None:
        """A stop signal during an evaluation that no training step follows before the next
        checkpoint: the one before training (step 0: nothing trained, no checkpoint), the one
        a resume owed (its checkpoint still holds it as due) or the one after the last step
        (its checkpoint is written). Exit 75 at once; the requeued job (train.resume=auto)
        starts again or resumes from that checkpoint."""
        ckpt = checkpoint.step_dir(self._checkpoint_root(), step) if step else None
        self.metrics.write({"event": "preempted", "step": step, "checkpoint": str(ckpt) if ckpt else None})
        log.warning(
            "stop signal received during the evaluation %s; exiting with %d so that a requeued job %s",
            f"at step {step}: checkpoint {ckpt} holds the trained state" if step else "before training",
            PREEMPTED_EXIT,
            "resumes from it (train.resume=auto)" if step else "starts it again",
        )
        self.metrics.close()
        raise Preempted(str(ckpt) if ckpt else "none")

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_root(self) -> Path:
        return runcheck.checkpoint_root(self.cfg)

    def _resume(self) -> tuple[int, dict | None, bool]:
        """(first step to run, eval results before training, whether that step's evaluation
        is still due: save_checkpoint's eval_due) from the checkpoint that
        runcheck.resolve_outputs chose (verified, loadable, no drift) before any write; the
        results are None with no checkpoint, and where the checkpoint's run did not evaluate
        before training (train.eval_before=false: it stored None)."""
        found = self.outputs.resume
        if found is None:
            return 0, None, False
        ckpt = found.path
        state = (
            self._load_checkpoint(ckpt)
            if self.replicas is not None
            else checkpoint.load(self.engine, self.method.trainable(), ckpt)
        )
        if state is None:  # fault tolerance: none left to load; the replica heals from a live one
            return 0, None, False
        ckpt = self.outputs.resume.path
        self._continue_schedule_at(self.lr, state.get("lr"))
        log.info(
            "resumed from %s at step %d (saved by %d ranks, now %d)", ckpt, state["step"], state["world"], self.world
        )
        self.metrics.write({"event": "resume", "from": str(ckpt), "step": state["step"]})
        if self.replicas is not None:
            self.replicas.set_step(state["step"])
        return state["step"], state.get("before"), bool(state.get("eval_due"))

    def _load_checkpoint(self, ckpt: Path, tries: int = 3) -> dict | None:
        """Fault tolerance: the writing replica group keeps checkpoint.keep_last and may
        remove the checkpoint a (re)starting group is reading; that group then takes the
        newest again (it heals from a live group at its first step in any case)."""
        for _attempt in range(tries):
            try:
                state, err = checkpoint.load(self.engine, self.method.trainable(), ckpt), None
            except (UserError, OSError) as exc:
                state, err = None, exc
            if comm.all_agree(err is None, self.device):
                return state
            log.warning(
                "fault tolerance: %s went away while this replica group read it (%s); taking the newest "
                "checkpoint again",
                ckpt,
                str(err or "on another rank").splitlines()[0][:200],
            )
            self.outputs = runcheck.resolve_outputs(self.cfg)
            if self.outputs.resume is None:
                return None
            ckpt = self.outputs.resume.path
        raise RunFailed(
            f"fault tolerance: no checkpoint in {self._checkpoint_root()} could be read in {tries} tries "
            "(the writing replica group replaced each while this one read it)"
        )

    def _continue_schedule_at(self, lr: float, saved_lr) -> None:
        """The restored schedule peaks at this run's train.lr: a scheduler state carries its
        old peak, and a changed train.lr would otherwise be ignored without a word."""
        sched = self.engine.lr_scheduler
        if sched is None or not hasattr(sched, "lr_lambdas"):
            return
        changed = saved_lr is not None and not math.isclose(float(saved_lr), lr, rel_tol=1e-9)
        if changed and self.rank == 0:  # one config fact: said once, not by every rank
            log.warning(
                "train.lr is %.3g, the checkpoint was trained at %.3g: the schedule continues at %.3g",
                lr,
                float(saved_lr),
                lr,
            )
        sched.base_lrs = [lr] * len(sched.base_lrs)
        for group, fn in zip(self.engine.optimizer.param_groups, sched.lr_lambdas):
            group["lr"] = lr * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.engine.optimizer.param_groups]

    def save_checkpoint(self, step: int, before: dict | None, eval_due: bool = False) -> Path:
        """`before`: the evaluation before training, None where there was none
        (train.eval_before=false); a resume takes it from here and never re-evaluates.
        `eval_due`: this step's evaluation was given up for a stop signal; the resume runs it
        first, so the run's curve keeps every point."""
        commcount.phase("checkpoint")
        extra = {
            "before": before,
            "eval_due": eval_due,
            "method": self.cfg.method.name,
            "lr": self.lr,
            "dtype": str(self.dtype).removeprefix("torch."),
            # the targets theta was trained for: an offline merge checks the base against them
            "layout": self.layout.to_json(),
            # the weights they were trained on: a resume and a merge refuse another base
            # (checkpoint.save adds the digest of all of these)
            "base_identity": self.base_identity(),
        }
        return checkpoint.save(
            self.engine,
            self.method.trainable(),
            self._checkpoint_root(),
            step,
            extra,
            to_yaml(self.cfg),
            self.cfg.checkpoint.keep_last,
        )

    # ---------------------------------------------------------------- signals
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
        return comm.any_rank(bool(self._stop_signal), self.device)

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        with self._peer_watch():
            return self._run()

    def close(self) -> None:
        """The process groups go before the interpreter exits (distributed.shutdown). Only
        where every rank ends together: a finished run, a preemption or a non-finite stop
        (both agreed through a collective); after any other error a peer may still be in a
        collective (`with Trainer(cfg) as t:` closes on exactly these ends)."""
        distributed.shutdown()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._release_folders()  # whatever ended the run: the folders are free again
        if exc_type is None or issubclass(exc_type, (Preempted, NonFiniteError)):
            self.close()
        return False

    @contextlib.contextmanager
    def _peer_watch(self):
        """A rank that dies (killed, out of memory) leaves its peers a gloo/NCCL error in
        the next collective: say what it means and how to go on (exit 1), not a traceback."""
        try:
            yield
        except (UserError, Preempted):
            raise
        except Exception as exc:
            if not comm.peer_lost(exc):
                raise
            raise RunFailed(
                f"rank {comm.rank()}: lost contact with another rank ({str(exc).splitlines()[0][:200]}): it "
                "died or was killed (out of memory? its log says). Last complete checkpoint: "
                f"{self._latest_checkpoint() or 'none yet'}; start the job again with train.resume=auto to "
                "continue from it"
            ) from None

    def _run(self) -> dict:
        if self.engine is None:
            self.setup()
        cfg, t = self.cfg, self.cfg.train
        self._install_signal_handlers()
        t_start = time.perf_counter()
        start, before, eval_due = self._resume()
        if self.rank == 0:
            write_atomic(self.out / "run_config.yaml", to_yaml(cfg))
        if before is None and start == 0 and t.eval_before:
            try:
                before = self.evaluate(0)
            except evaluate.Abandoned:
                self._stopped_in_eval(0)
            self.metrics.write({"event": "eval", "step": 0, **before})
            log.info("before training: %s", _fmt(before))
        elif before is None:
            # Not evaluated: train.eval_before=false, or a resume of such a run (whose
            # checkpoint holds no `before`). Never evaluated at resume time: that would
            # score the trained model at step `start` as if it were the base.
            log.info(
                "before training: not evaluated (%s); the summary's *_before fields are null",
                "train.eval_before=false"
                if start == 0
                else f"resumed at step {start} from a run with train.eval_before=false",
            )
        if start == t.max_steps:
            log.info(
                "nothing to train: %s is at train.max_steps=%d; writing the run's outputs from it",
                self.outputs.resume.path,
                start,
            )
        # given up for the stop signal that ended the last attempt; given up again, the
        # checkpoint resumed from still holds it as due
        if eval_due and start < t.max_steps and not self._evaluate_during(start):
            self._stopped_in_eval(start)
        progress = Progress(t.max_steps, start, cfg.method.name, t.log_every) if self.rank == 0 else None
        history = []
        every = cfg.checkpoint.every_steps
        step = start
        while step < t.max_steps:
            if self.replicas is not None:
                # the quorum of this step: a replica that is behind heals here and jumps to
                # its peers' step (the manager's step is the data cursor)
                step = self._replica_step()
                if step >= t.max_steps:
                    break
            rec = self.train_step(step)
            if rec.get("committed") is False:
                self.metrics.write({"event": "retry", "step": step + 1, "replicas": rec["replicas"]})
                log.warning("step %d not committed (a replica group failed during it): running it again", step + 1)
                continue
            rec.update(peak_memory_gb())
            history.append(rec)
            self.metrics.write(rec)
            if progress is not None:
                progress.update(rec)
            due = False
            if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.max_steps:
                due = not self._evaluate_during(step + 1)
            if self._stop_requested() and step + 1 < t.max_steps:
                if self._writer_node():
                    path = self.save_checkpoint(step + 1, before, eval_due=due)
                    self.metrics.write({"event": "preempted", "step": step + 1, "checkpoint": str(path)})
                    log.warning(
                        "stop signal received: checkpoint %s written; exiting with %d so that a "
                        "requeued job resumes (train.resume=auto)",
                        path,
                        PREEMPTED_EXIT,
                    )
                else:  # fault tolerance: this replica group leaves; the writing one checkpoints
                    path = "the writing replica group's"
                    self.metrics.write({"event": "preempted", "step": step + 1, "checkpoint": None})
                    log.warning(
                        "stop signal received: this replica group leaves the quorum (the others train on, "
                        "or the writing group checkpoints if it got the signal too); exiting with %d",
                        PREEMPTED_EXIT,
                    )
                if progress is not None:
                    progress.close()
                self.metrics.close()
                raise Preempted(str(path))
            if every and (step + 1) % every == 0 and step + 1 < t.max_steps and self._writer_node():
                self.save_checkpoint(step + 1, before)
            step += 1
        if progress is not None:
            progress.close()
        commcount.phase("summary")
        # Peak memory of training itself, before the gathers of checkpoint and export.
        train_mem = {f"train_{k}": v for k, v in comm.all_max(peak_memory_gb(), self.device).items()}
        model_state = zero3.model_state_bytes(self.engine)  # optimizer state exists after a step
        writer = self._writer_node()
        if start < t.max_steps and writer:  # equal: the resumed checkpoint is this step, kept as it is
            self.save_checkpoint(t.max_steps, before)
        try:
            after = self.evaluate(t.max_steps, last=True)
        except evaluate.Abandoned:  # the last checkpoint is this step: a resume writes the outputs from it
            self._stopped_in_eval(t.max_steps)
        self.metrics.write({"event": "eval", "step": t.max_steps, **after})
        wall = time.perf_counter() - t_start
        commcount.phase("adapter")
        adapter_dir = self.save_adapter(self.out / "adapter") if writer else None
        comm.barrier()
        if cfg.export.merged and writer:
            self.export_merged()
        if self.replicas is not None:
            self.replicas.shutdown()
        commcount.phase("summary")
        mem = comm.all_max(peak_memory_gb(), self.device)
        steady = [r["step_time_s"] for r in history[1:]] or [r["step_time_s"] for r in history] or [0.0]
        b = before or {}  # None: not evaluated before training (train.eval_before=false): every *_before null
        summary = {
            "event": "summary",
            "method": cfg.method.name,
            "steps": t.max_steps,
            "world": self.world,
            "lr": self.lr,
            "eval_loss_before": b.get("eval_loss"),
            "eval_loss_after": after["eval_loss"],
            "answer_accuracy_before": b.get("answer_accuracy"),
            "answer_accuracy_after": after.get("answer_accuracy"),
            "accuracy_before": b.get("accuracy"),
            "accuracy_after": after.get("accuracy"),
            "exact_match_before": b.get("exact_match"),
            "exact_match_after": after.get("exact_match"),
            "final_loss": history[-1]["loss"] if history else None,
            "wall_s": wall,
            "median_step_time_s": sorted(steady)[len(steady) // 2],
            "trainable_params": self.method.trainable_params(),
            "adapter_bytes": folder_bytes(adapter_dir),
            "checkpoint_bytes": folder_bytes(checkpoint.step_dir(self._checkpoint_root(), t.max_steps))
            if writer
            else None,
            "writer": writer,
            "model_state_bytes": model_state,
            **train_mem,
            **mem,
        }
        # With dist.count_comm: every rank's counts in <output_dir>/comm, the last step's here.
        summary.update(commcount.finish(self.out / "comm", self.placement))
        self.metrics.write(summary)
        self.metrics.close()
        if self.rank == 0:
            print(summary_table(summary, adapter_dir), flush=True)
            fell = answer_fell(summary)
            if before is None and cfg.train.objective == "choices":
                log.info(
                    "the generated answers were not compared with the base model's (not evaluated before "
                    "training): train.objective=choices does not train the answer a server generates"
                )
            if fell and cfg.train.objective == "choices":
                log.warning(
                    "%s: train.objective=choices ranks the choices against each other and does not "
                    "train the answer a server generates; train.objective=lm (or choices_lm) trains it",
                    fell,
                )
        return summary

    # ---------------------------------------------------------------- outputs
    def base_model_info(self) -> dict:
        from .identity import identity

        # identity: what every reader of the adapter checks the base it is applied to against
        return {
            "name": display_name(self.cfg.model.path),
            "path": str(Path(self.cfg.model.path).resolve()),
            "architectures": list(getattr(self.method.model.config, "architectures", None) or []),
            "identity": identity(self.cfg.model.path),
        }

    def base_identity(self) -> dict:
        from .identity import identity

        return identity(self.cfg.model.path)

    def save_adapter(self, out_dir: Path) -> Path | None:
        """Collective: the method's adapter folder (None: the method has none)."""
        return self.method.save_adapter(out_dir, {"base_model": self.base_model_info(), "dtype": self.dtype})

    def export_merged(self) -> Path:
        """The merged Hugging Face folder, written by the ranks together (collective)."""
        from .export.files import parse_dtype
        from .export.zero3 import export_run

        e, t0 = self.cfg.export, time.perf_counter()
        commcount.phase("export")
        out = export_run(
            self.method,
            Path(self.cfg.model.path),
            export_dir(self.cfg),
            self.dtype,
            parse_dtype(e.dtype),
            e.max_shard_size,
            e.overwrite,
            self.device,
        )
        dt = time.perf_counter() - t0
        log.info("merged model written to %s in %.1f s", out, dt)
        self.metrics.write({"event": "export", "dir": str(out), "seconds": dt})
        return out

    def export_only(self) -> Path:
        """Load a checkpoint (train.resume) and write the merged model; no training."""
        self._export_only = True
        with self._peer_watch():
            if self.engine is None:
                self.setup()  # refuses a missing train.resume or checkpoint before any write
            self._resume()
            out = self.export_merged()
            self.metrics.close()
            return out


def _folder_state(cfg: DictConfig) -> list:
    """What the output folders hold, cheaply (names, sizes, times; not the lock files):
    equal before and after taking the locks means runcheck's verdict still stands."""
    state = []
    for folder in (Path(cfg.output_dir), runcheck.checkpoint_root(cfg)):
        try:
            for p in sorted(folder.iterdir()):
                if not p.name.endswith(ownership.LOCK_NAME):
                    st = p.stat()
                    state.append((str(p), st.st_size, st.st_mtime_ns))
        except FileNotFoundError:  # not there yet: as empty as a folder the lock just created
            pass
        except OSError:
            state.append((str(folder), None, None))
    latest = runcheck.checkpoint_root(cfg) / checkpoint.LATEST
    try:
        state.append(latest.read_text())
    except OSError:
        pass
    return state


def _ft_mode(cfg: DictConfig) -> bool:
    return cfg.dist.fault_tolerance == "nodes"


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def main(cfg: DictConfig) -> dict:
    with Trainer(cfg) as trainer:
        return trainer.run()
