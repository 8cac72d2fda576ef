"""Fault probes of kind `upfront` (tests/faults/cases_upfront.py)."""

import pytest

from tests.faults.assertions import assert_case, cases_of


@pytest.mark.parametrize("case", cases_of("upfront"), ids=lambda c: c.id)
def test_upfront_faults(faults, case):
    assert_case(faults, case)
