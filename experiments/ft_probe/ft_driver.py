"""Lighthouse + N replica groups ("nodes") x P ranks on localhost; kill -9 node KILL at the
survivors' step KILL_AT, restart it at RESTART_AT. Each node is its own little world (own
MASTER_PORT), as torchft expects. Logs: OUT/lighthouse.log, OUT/node<k>[.restart].log.
  python ft_driver.py OUT [MODE=plain|ds] [NODES=2] [PER=2] [STEPS=20] [KILL=1] [KILL_AT=5] [RESTART_AT=8]"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
kv = dict(a.split("=", 1) for a in sys.argv[2:])
MODE, NODES, PER = kv.get("MODE", "plain"), int(kv.get("NODES", 2)), int(kv.get("PER", 2))
STEPS, KILL = int(kv.get("STEPS", 20)), int(kv.get("KILL", 1))
KILL_AT, RESTART_AT = int(kv.get("KILL_AT", 5)), int(kv.get("RESTART_AT", 8))


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


lh_port = port()
lh = subprocess.Popen(
    [
        "nice",
        "-n",
        "10",
        str(Path(PY).parent / "torchft_lighthouse"),
        "--min_replicas",
        "1",
        "--bind",
        f"[::]:{lh_port}",
        "--join_timeout_ms",
        "30000",
        "--heartbeat_timeout_ms",
        "2000",
    ],
    stdout=open(out / "lighthouse.log", "w"),
    stderr=subprocess.STDOUT,
    start_new_session=True,
)
time.sleep(1)


def start_node(k, tag=""):
    mport, procs = port(), []
    log = open(out / f"node{k}{tag}.log", "w")
    for r in range(PER):
        env = dict(
            os.environ,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(PER),
            LOCAL_WORLD_SIZE=str(PER),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(mport),
            TORCHFT_LIGHTHOUSE=f"http://localhost:{lh_port}",
            NODE=str(k),
            MODE=MODE,
            STEPS=str(STEPS),
            OMP_NUM_THREADS="1",
            DS_ACCELERATOR="cpu",
            PYTHONUNBUFFERED="1",
        )
        procs.append(
            subprocess.Popen(
                ["nice", "-n", "10", PY, str(HERE / "ft_worker.py")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=(r == 0),
                preexec_fn=None if r == 0 else None,
            )
        )
    return procs


def survivor_step():
    txt = (out / "node0.log").read_text(errors="replace")
    s = re.findall(r"\[node0 r0\] step (\d+) ->", txt)
    return int(s[-1]) if s else -1


nodes = {k: start_node(k) for k in range(NODES)}
t0, killed, restarted = time.time(), False, False
while time.time() - t0 < 600:
    st = survivor_step()
    if KILL >= 0 and not killed and st >= KILL_AT:
        for p in nodes[KILL]:
            os.kill(p.pid, signal.SIGKILL)  # kill -9 every process of that node (we started them)
        print(f"{time.time() - t0:.1f}s killed node{KILL} at survivor step {st}", flush=True)
        killed = True
    if killed and not restarted and st >= RESTART_AT:
        nodes[KILL] = start_node(KILL, ".restart")
        restarted = True
        print(f"{time.time() - t0:.1f}s restarted node{KILL} at survivor step {st}", flush=True)
    if all(p.poll() is not None for ps in nodes.values() for p in ps):
        break
    time.sleep(0.2)
rcs = {k: [p.poll() for p in ps] for k, ps in nodes.items()}
print("exit codes", rcs, f"{time.time() - t0:.1f}s", flush=True)
for ps in nodes.values():
    for p in ps:
        if p.poll() is None:
            p.kill()
lh.terminate()
lh.wait()
