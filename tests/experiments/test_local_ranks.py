"""experiments/local_ranks.py: what the tests and the benchmark start ranks with."""

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
