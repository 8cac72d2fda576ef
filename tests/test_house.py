"""The floor plan holds: no import cycle, the library never imports the experiments, no
method-name branches outside the methods, every method implements the interface, and the
configuration reference is the schema's own text."""
import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PKG = REPO / "gpart_ds"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules of gpart_ds / experiments imported by a file (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import submodule` imports the submodule; `from pkg import name`
            # runs pkg/__init__ for a name defined there
            subs = {f"{target}.{a.name}" for a in node.names}
            found = {m for m in subs if m in _ALL}
            out |= found if len(found) == len(subs) else found | {target}
    return {m for m in out if m.split(".")[0] in ("gpart_ds", "experiments")}


_ALL = {_module_name(p) for p in list(PKG.rglob("*.py")) + list((REPO / "experiments").rglob("*.py"))}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, top_level_only) if m in files and m != name}
    return graph


def test_the_package_import_graph_has_no_cycle():
    graph = _graph(top_level_only=True)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert len(graph) > 20   # the walk saw the package


def test_the_library_never_imports_the_experiments():
    offenders = {_module_name(p): sorted(m for m in _imports(p, False) if m.startswith("experiments"))
                 for p in PKG.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def _method_name_comparisons(path: Path, names: set[str]) -> list[str]:
    """Lines that compare something with a method's name (`x == "gpart"`, `in ("lora", ...)`)."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            consts = [c for c in [node.left, *node.comparators] for c in
                      (c.elts if isinstance(c, (ast.Tuple, ast.List, ast.Set)) else [c])
                      if isinstance(c, ast.Constant) and c.value in names]
            if consts:
                hits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return hits


def test_no_method_branches_outside_the_methods():
    from gpart_ds import methods

    names = set(methods.names())
    files = [p for p in list(PKG.rglob("*.py")) + list((REPO / "experiments").rglob("*.py"))
             + list((REPO / "launch").glob("*.py"))
             if "methods" not in p.relative_to(REPO).parts]
    hits = [h for p in files for h in _method_name_comparisons(p, names)]
    assert hits == [], f"method-name branches outside gpart_ds/methods: {hits}"


def test_the_branch_detector_sees_a_branch(tmp_path):
    # the guard above can fail: a file with a branch is found
    f = REPO / "gpart_ds" / "__branch_probe__.py"
    try:
        f.write_text('def f(m):\n    return 1 if m.name == "lora" else 2\n')
        assert _method_name_comparisons(f, {"lora"}) == ["gpart_ds/__branch_probe__.py:2"]
    finally:
        f.unlink()


@pytest.mark.parametrize("hook", ["validate", "trainable_sizes", "auto_lr", "plan_rows", "label", "build",
                                  "step_flops", "step_traffic"])
def test_every_method_implements_the_interface(hook):
    from gpart_ds import methods
    from gpart_ds.methods.base import Method

    for name, cls in methods.REGISTRY.items():
        assert cls.name == name
        if hook in ("trainable_sizes", "plan_rows", "build", "step_flops", "step_traffic"):
            assert getattr(cls, hook) is not getattr(Method, hook), f"{name} lacks {hook}"
        if hook == "auto_lr":   # a calibrated rate for every method (train.lr: auto)
            from gpart_ds.plan import spec

            assert cls.auto_lr(spec(name, d=1024), 10**6) > 0


def test_the_configuration_reference_is_generated_from_the_schema():
    from gpart_ds.config import schema_markdown

    doc = REPO / "docs" / "configuration.md"
    assert doc.read_text() == schema_markdown(), \
        "docs/configuration.md is stale: python -m gpart_ds.config --markdown > docs/configuration.md"
