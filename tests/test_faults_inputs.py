"""Fault injection: configs, command-line overrides, data files, other CLIs' arguments.

Bad input must give exit 2 and an `error:` line naming what and where (config key,
file:line, override), with nothing already written changed; a valid but unusual input
must work. The cases and their expectations live in tests/faults/cases_config.py,
cases_data.py and cases_cli.py (one home, shared with `python -m tests.faults.probe`); each
runs its CLI's main(argv) in a fresh fork of a warm process (tests/faults/forkserver.py).
"""

import pytest

from tests.faults.assertions import assert_case, cases_of


@pytest.mark.parametrize("case", cases_of("config", "override", "data", "cli"), ids=lambda c: c.id)
def test_bad_input_is_refused_clearly(faults, case):
    assert_case(faults, case)
