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
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    ap.add_argument("--export-only", action="store_true",
                    help="load the checkpoint named by train.resume and write the merged model "
                         "(export.dir) without training")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the model on the meta device, report D, d, group sizes and the "
                         "memory plan, and exit without training (no weights or data read)")
    dry = ap.add_argument_group("dry run only (default: the launcher's world size, this GPU's memory)")
    dry.add_argument("--nodes", type=int)
    dry.add_argument("--gpus-per-node", type=int)
    dry.add_argument("--gpu-mem-gb", type=float)
    dry.add_argument("--model-config", help="config.json (or folder) with the model's shapes")
    ap.add_argument("overrides", nargs="*", help="key.sub=value")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import warnings

    import torch

    # DeepSpeed 0.19 calls collectives that torch 2.13 marks deprecated, once per step.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from gpart_ds.errors import run_cli

    return run_cli(lambda: _run(args))


def _run(args) -> int:
    from experiments import assets
    from gpart_ds.config import load_config
    from gpart_ds.trainer import PREEMPTED_EXIT, Preempted, Trainer

    overrides = list(args.overrides) + (["export.merged=true"] if args.export_only else [])
    cfg = load_config(args.config, overrides, check_files=False)
    if args.dry_run:
        from gpart_ds import dryrun

        assets.check_recipes(cfg)
        return dryrun.run(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                          gpu_mem_gb=args.gpu_mem_gb, model_config=args.model_config)
    assets.prepare(cfg)   # the bundled model/data, when the config points at them
    with Trainer(cfg) as trainer:
        try:
            trainer.export_only() if args.export_only else trainer.run()
        except Preempted:
            return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    from gpart_ds.distributed import exit_process

    exit_process(main())   # a rank that ran skips the interpreter's teardown (see there)
