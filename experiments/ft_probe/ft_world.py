"""Counter-case: the layout launch/sim_nodes.py makes today (ONE torch.distributed world over all
nodes, theta a world-wide ZeRO-3 parameter). Kill -9 the ranks of "node 1" after step 3 and watch
the ranks of node 0. Run: python ft_world.py  (spawns 4 ranks = 2 nodes x 2; ~1 min)."""

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

if os.environ.get("RANK") is None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ps = [
        subprocess.Popen(
            ["nice", "-n", "10", sys.executable, __file__],
            env=dict(
                os.environ,
                RANK=str(r),
                LOCAL_RANK=str(r % 2),
                WORLD_SIZE="4",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1",
            ),
        )
        for r in range(4)
    ]
    t0 = time.time()
    while not os.path.exists(f"/tmp/ftworld_{port}_step3") and time.time() - t0 < 300:
        time.sleep(0.2)
    for p in ps[2:]:
        os.kill(p.pid, signal.SIGKILL)
    print(f"parent: killed node 1 (ranks 2,3) at {time.time() - t0:.1f}s", flush=True)
    for p in ps[:2]:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            print("parent: node-0 rank still blocked after 120 s; killing it", flush=True)
            p.kill()
    print("parent: node-0 exit codes", [p.returncode for p in ps[:2]], f"{time.time() - t0:.1f}s")
    sys.exit(0)

import deepspeed
import torch
import torch.nn as nn

deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=timedelta(seconds=20))
rank = int(os.environ["RANK"])
cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
with deepspeed.zero.Init(config_dict_or_path=cfg):
    base = nn.Linear(16, 16)
base.weight.requires_grad_(False)
base.bias.requires_grad_(False)


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = base
        self.theta = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return self.base(x * (1 + self.theta)).pow(2).mean()


m = M()
engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW([m.theta], lr=1e-2), config=cfg)
for step in range(100):
    t = time.time()
    try:
        loss = engine(torch.randn(4, 16))
        engine.backward(loss)
        engine.step()
    except Exception as e:
        print(f"rank {rank} step {step}: {type(e).__name__} after {time.time() - t:.1f}s: {str(e)[:300]}", flush=True)
        os._exit(3)
    if step == 3 and rank == 0:
        open(f"/tmp/ftworld_{os.environ['MASTER_PORT']}_step3", "w").close()
    time.sleep(0.3)
