"""Fault probes of kind `identity` (tests/faults/cases_identity.py)."""

import pytest

from tests.faults.assertions import assert_case, cases_of


@pytest.mark.parametrize("case", cases_of("identity"), ids=lambda c: c.id)
def test_identity_faults(faults, case):
    assert_case(faults, case)
