"""VeRA (PEFT) of rank r on GPart's targets: the random-projection baseline.

Frozen random projections A (r x max in) and B (max out x r), shared by every target
and regenerated from method.seed; trained per target: lambda_d (r) and lambda_b (out).
config.py: its keys; cost.py: what the planner counts; here: the run.
"""

from __future__ import annotations

from ..peft_common import PeftMethod
from .config import VeRAConfig
from .cost import VeRACost


class VeRA(PeftMethod):
    name = "vera"
    config_class = VeRAConfig
    cost_class = VeRACost
    DEFAULT_LR = 1e-2  # VeRA's scaling vectors take ~10x LoRA's rate (the VeRA paper's settings)

    def peft_config(self, target_names: list[str]):
        from peft import VeraConfig

        m = self.cfg
        # The shared projections are sized by the largest adapted shape and regenerated
        # from projection_prng_key; saved with the adapter for portability.
        return VeraConfig(
            r=m.rank,
            vera_dropout=m.dropout,
            target_modules=target_names,
            projection_prng_key=m.seed,
            save_projection=True,
            task_type="CAUSAL_LM",
        )
