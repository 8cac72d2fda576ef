"""Fault injection on 2-rank ZeRO-3 runs (the deepspeed launcher, CPU ranks): refusals
and failures must reach every rank (no rank left waiting in a collective), with the same
clear error and nothing written. Cases: tests/faults/cases_ranks.py."""

import pytest

from tests.faults.assertions import assert_case, cases_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("case", cases_of("ranks"), ids=lambda c: c.id)
def test_rank_faults(faults, case):
    assert_case(faults, case)
