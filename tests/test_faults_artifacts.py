"""Fault injection on what runs produce and consume: adapters (export, evaluate),
checkpoint folders given to export, reference adapters, merged models (verify) and base
models (missing, wrong shape, renamed key, NaN, truncated).

An adapter is merged or evaluated only into the model it was trained on, only when it is
intact (checksum) and finite; everything else is exit 2 naming the file and the key.
Cases: tests/faults/cases_adapters.py, cases_base.py.
"""

import pytest

from tests.faults.assertions import assert_case, cases_of


@pytest.mark.parametrize("case", cases_of("adapter", "evaluate", "verify", "base"), ids=lambda c: c.id)
def test_artifact_faults(faults, case):
    assert_case(faults, case)
