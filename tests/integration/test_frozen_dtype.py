"""The node-local frozen base is partitioned in the training dtype on every accelerator."""

import json

import pytest

from tests.helpers import run_ranks

pytestmark = [pytest.mark.distributed]


def test_shard_local_base_keeps_the_training_dtype_where_the_accelerator_has_no_fp16(tmp_path, tiny_assets):
    # zero.Init's own dtype argument gave bf16 shards for an fp32 run on such machines: the
    # base rounded in silence (docs/deepspeed.md). Both ranks, every parameter, both dtypes.
    run_ranks(2, "tests/integration/frozen_dtype_worker.py", str(tmp_path), timeout=600)
    for r in range(2):
        report = json.loads((tmp_path / f"rank{r}.json").read_text())
        for precision, dtype in (("fp32", "torch.float32"), ("bf16", "torch.bfloat16")):
            rows = report[precision]
            assert len(rows) == 21, rows.keys()  # 2 layers x 9, embeddings, final norm, lm_head
            bad = {n: v for n, v in rows.items() if v != {"dtype": dtype, "equal": True}}
            assert not bad, (r, precision, bad)
