"""launch/train.py on a rank that signals itself SIGTERM as one evaluation starts: what
SLURM sends before a time limit or a preemption, landing mid-evaluation.

    STOP_AT_EVAL=STEP [STOP_RANK=R] python tests/integration/stop_in_eval_worker.py --config ... k=v ...

STEP: the evaluation's step (0: the one before training; max_steps: the last); only rank
STOP_RANK (default 0) is signalled, so the others learn of it through the collective.
"""

import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "launch")]

from gpart_ds.trainer import Trainer  # noqa: E402

_evaluate = Trainer.evaluate


def evaluate(self, step, last=False):
    if step == int(os.environ["STOP_AT_EVAL"]) and self.rank == int(os.environ.get("STOP_RANK", "0")):
        os.kill(os.getpid(), signal.SIGTERM)
    return _evaluate(self, step, last)


Trainer.evaluate = evaluate

if __name__ == "__main__":
    import train

    sys.exit(train.main(sys.argv[1:]))
