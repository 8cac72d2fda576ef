"""Fault probes of kind `writers` (tests/faults/cases_writers.py)."""

import pytest

from tests.faults.assertions import assert_case, cases_of


@pytest.mark.parametrize("case", cases_of("writers"), ids=lambda c: c.id)
def test_writers_faults(faults, case):
    assert_case(faults, case)
