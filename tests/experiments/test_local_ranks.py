"""experiments/local_ranks.py: what the tests and the benchmark start ranks with."""

import os
import subprocess
import sys
import time

import pytest

from experiments import local_ranks

# One os.write per rank: the ranks share one open file (as under a launcher) and run
# unbuffered, where print() writes the line and its newline apart and two ranks can interleave.
SHOW = (
    "import os; os.write(1, (' '.join(os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', "
    "'MASTER_ADDR', 'MASTER_PORT')) + '\\n').encode())"
)


def test_every_rank_gets_torchruns_variables_and_one_master(tmp_path):
    out = tmp_path / "out"
    with open(out, "w") as fh:
        assert local_ranks.run(3, [sys.executable, "-c", SHOW], stdout=fh) == 0
    rows = sorted(line.split() for line in out.read_text().splitlines())
    assert [r[:3] for r in rows] == [["0", "3", "0"], ["1", "3", "1"], ["2", "3", "2"]]
    assert len({(r[3], r[4]) for r in rows}) == 1 and rows[0][3] == "127.0.0.1"


def test_the_first_failing_rank_ends_the_others_and_gives_its_status(tmp_path):
    # rank 1 fails at once; rank 0 would sleep for a minute unless ended
    code = "import os, sys, time; sys.exit(7) if os.environ['RANK'] == '1' else time.sleep(60)"
    t0 = time.monotonic()
    assert local_ranks.run(2, [sys.executable, "-c", code]) == 7
    assert time.monotonic() - t0 < 30


def test_a_timeout_ends_every_rank_and_raises():
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        local_ranks.run(2, [sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert time.monotonic() - t0 < 30


def test_sigterm_to_the_caller_ends_its_ranks_first(tmp_path):
    # `kill STUDY_PID` (or `timeout`) used to end the study and leave its training ranks
    # running on, orphaned, for the rest of their run
    rank = "import os, time; open(os.environ['RANK'] + '.pid', 'w').write(str(os.getpid())); time.sleep(300)"
    caller = (
        "import sys; from experiments import local_ranks; from gpart_ds.errors import run_cli; "
        f"sys.exit(run_cli(lambda: local_ranks.run(2, [sys.executable, '-c', {rank!r}], cwd={str(tmp_path)!r})))"
    )
    proc = subprocess.Popen([sys.executable, "-c", caller], stderr=subprocess.PIPE, text=True)
    pids = [tmp_path / f"{r}.pid" for r in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(p.is_file() and p.read_text() for p in pids):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.terminate()
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 75 and err.startswith("stopped: SIGTERM: the 2 rank(s) of"), err
    for p in pids:
        pid = int(p.read_text())
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2], pid
