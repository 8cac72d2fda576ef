"""Adding a method touches only its folder and the registry: a toy method, its
config, cost and run defined here, put in the registry, is a key of the assembled
`method:` section with its own help text, and the planner plans it through its cost."""

import dataclasses

import pytest

from gpart_ds import methods, plan
from gpart_ds.config import schema
from gpart_ds.methods.base import Method, MethodConfig, MethodRoot, option
from gpart_ds.methods.cost import Cost


@dataclasses.dataclass
class ToyConfig(MethodConfig):
    name: str = "toy"
    width: int = option(4, "trained numbers per target", drift=True)


class ToyCost(Cost):
    def trainable_sizes(self, arch):
        return [self.cfg.width] * len(arch.targets)

    def plan_rows(self, plan_, arch, ctx):
        plan_.add("toy numbers", self.trainable_count(arch) * 16)

    def step_flops(self, arch, ctx):
        return {}

    def step_traffic(self, traffic, arch):
        pass


class Toy(Method):
    name = "toy"
    config_class = ToyConfig
    cost_class = ToyCost
    DEFAULT_LR = 1e-3

    def validate(self, need):
        need(self.cfg.width >= 1, "method.width", "must be >= 1")

    def build(self, base, layout, device):
        self.layout, self.root = layout, MethodRoot(base)
        return self.root


@pytest.fixture
def tiny_arch():
    return plan.Arch(
        name="toy",
        params=(
            ("model.embed_tokens.weight", 32 * 8),
            ("model.layers.0.q.weight", 64),
            ("model.layers.0.o.weight", 64),
            ("model.norm.weight", 8),
        ),
        targets=((8, 8), (8, 8)),
        hidden=8,
        intermediate=16,
        layers=1,
        heads=2,
        kv_heads=2,
        head_dim=4,
        vocab=32,
        target_names=("model.layers.0.q", "model.layers.0.o"),
    )


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "toy", Toy)
    return Toy


def test_a_toy_method_is_registered_by_one_line_and_described_by_its_folder(toy, tiny_arch):
    section = {f.name: f for f in dataclasses.fields(schema._method_section())}
    assert section["width"].metadata["help"] == "toy: trained numbers per target"
    assert section["name"].metadata["help"].endswith("full, toy (methods/)")
    assert Toy.config_keys == {"name", "width"} and Toy.drift_keys == ("name", "width")
    p = plan.estimate(tiny_arch, world=2, method=ToyConfig(width=8))
    assert p.get("toy numbers") == 8 * len(tiny_arch.targets) * 16
    with pytest.raises(plan.PlanError, match="method.width: must be >= 1"):
        plan.estimate(tiny_arch, world=2, method=ToyConfig(width=0))
    assert methods.create(ToyConfig()).auto_lr(10**6) == 1e-3


def test_two_methods_that_disagree_on_a_shared_keys_default_are_refused(monkeypatch):
    @dataclasses.dataclass
    class BadConfig(MethodConfig):
        name: str = "bad"
        seed: int = option(7, "another seed")

    class Bad(Toy):
        name = "bad"
        config_class = BadConfig

    monkeypatch.setitem(methods.REGISTRY, "bad", Bad)
    with pytest.raises(TypeError, match="method.seed: gpart and bad disagree"):
        schema._method_section()
