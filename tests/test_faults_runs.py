"""Fault injection on training runs: checkpoints, resume, output folders, stop signals,
non-finite values, a full disk.

Expected: damaged checkpoints skipped with a warning (or refused when none is usable),
SIGTERM -> checkpoint -> exit 75, a run never replaces another run's results without an
explicit choice, training stops on a non-finite loss, a full disk gives a clear error and
no stale temporary folder; nothing that existed is changed unless that is the command's
purpose. Cases: tests/faults/cases_checkpoint.py, cases_runtime.py.
"""

import pytest

from tests.faults.assertions import assert_case, cases_of


@pytest.mark.parametrize(
    "case", cases_of("checkpoint", "output", "signal", "nonfinite", "diskfull"), ids=lambda c: c.id
)
def test_run_faults(faults, case):
    assert_case(faults, case)
