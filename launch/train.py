#!/usr/bin/env python
"""Train a GPart adapter.

    deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml [key.sub=value ...]
    python launch/train.py --config tiny train.max_steps=5      # one process
    mpirun -np 2 python launch/train.py --config tiny            # ranks from mpi4py
    python launch/train.py --config llama70b --dry-run --nodes 8 --gpus-per-node 8 --gpu-mem-gb 80

Without a GPU DeepSpeed runs on CPU ranks with gloo (DS_ACCELERATOR=cpu is set here).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML file, or a name in configs/")
    ap.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the deepspeed launcher
    ap.add_argument(
        "--export-only",
        action="store_true",
        help="load the checkpoint named by train.resume and write the merged model (export.dir) without training",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model on the meta device, report D, d, group sizes and the "
        "memory plan, and exit without training (no weights or data read)",
    )
    dry = ap.add_argument_group("dry run only (default: the launcher's world size, this GPU's memory)")
    dry.add_argument("--nodes", type=int)
    dry.add_argument("--gpus-per-node", type=int)
    dry.add_argument("--gpu-mem-gb", type=float)
    dry.add_argument("--model-config", help="config.json (or folder) with the model's shapes")
    ap.add_argument("overrides", nargs="*", help="key.sub=value")
    return ap.parse_args(argv)


# The stop signals a scheduler sends (SLURM: SIGUSR1 before the time limit, SIGTERM on
# preemption); the deepspeed launcher's death reaches a rank as SIGTERM too.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_stop_seen: list[int] = []


def _stop_during_startup(signum, frame):
    """Until training installs its own handler (which checkpoints at the end of a step), a
    stop signal abandons the start-up: without this the process died of the signal (status
    143, no word), which the SLURM script does not requeue. Raised as an exception so that
    temporary files and the output folder's lock are given back on the way out."""
    import signal

    from gpart_ds.errors import Stopped
    from gpart_ds.ownership import defer_stop

    _stop_seen.append(signum)
    exc = Stopped(_stop_message(signal.Signals(signum).name))
    if defer_stop(exc):  # a lock file is being taken or given back: raised when that ends
        return
    raise exc


def _stop_message(name: str) -> str:
    return (
        f"{name} while the run was starting (before its first training step, or during --export-only): "
        "nothing of it was kept; exit 75 so that slurm/gpart.sh requeues the job, and train.resume=auto "
        "starts it again"
    )


def install_startup_stop() -> None:
    import signal

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), _stop_during_startup)


def main(argv=None) -> int:
    args = parse(argv)
    if not args.dry_run:  # first thing: importing torch alone takes seconds
        install_startup_stop()
    else:
        import signal

        for name in STOP_SIGNALS:  # a dry run has nothing to requeue: a signal ends it as usual
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    from gpart_ds.errors import run_cli  # standard library only: no signal can be missed before it

    return run_cli(lambda: _start(args))


def _start(args) -> int:
    import warnings

    import torch

    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per step.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return _stop_wins(args)


def _stop_wins(args) -> int:
    """A stop signal that arrived while a rank waited in C code (a collective, a peer that
    had already left) may surface as that call's own error: the signal is what happened."""
    import signal

    from gpart_ds.errors import Stopped

    try:
        return _run(args)
    except Stopped:
        raise
    except BaseException:
        if _stop_seen:
            raise Stopped(_stop_message(signal.Signals(_stop_seen[0]).name)) from None
        raise


def _run(args) -> int:
    from gpart_ds import assets
    from gpart_ds.config import load_config
    from gpart_ds.trainer import PREEMPTED_EXIT, Preempted, Trainer

    overrides = list(args.overrides) + (["export.merged=true"] if args.export_only else [])
    cfg = load_config(args.config, overrides, check_files=False)
    if args.dry_run:
        from gpart_ds import dryrun

        assets.check_recipes(cfg)
        return dryrun.run(
            cfg,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gpu_mem_gb=args.gpu_mem_gb,
            model_config=args.model_config,
        )
    assets.prepare(cfg)  # the bundled model/data, when the config points at them
    with Trainer(cfg) as trainer:
        try:
            trainer.export_only() if args.export_only else trainer.run()
        except Preempted:
            return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    install_startup_stop()  # before the import below: it loads torch (seconds on a busy node)
    from gpart_ds.errors import Stopped

    try:
        from gpart_ds.distributed import exit_process
    except Stopped as exc:
        print(f"stopped: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    exit_process(main())  # a rank that ran skips the interpreter's teardown (see there)
