"""The floor plan holds: no import cycle and every import points down the layers (every
import, inside functions too), the library never imports the experiments, no method-name
branches outside the methods, every method implements the interface, and the
configuration reference is the schema's own text."""

import ast
import dataclasses
from pathlib import Path

import pytest

from tests.helpers import REPO

PKG = REPO / "gpart_ds"


# The import graph: every import statement, at the top of a file and inside functions
# alike, of every module of the package, the experiments and the launch scripts. `import
# a.b.c` also runs a/__init__ and a/b/__init__: those count as imported too (not the
# importer's own packages, which are running already). Code under `if __name__ ==
# "__main__":` runs as another module (__main__), after the file's own module is
# complete, so its imports are not edges of the file's module.
ROOTS = ("gpart_ds", "experiments", "launch")

# Which layer may import which: a module imports its own layer or a lower one, never a
# higher one (and no cycle within a layer). Bottom first; a module belongs to the layer
# of its longest matching prefix. docs/design.md says the same in words.
LAYERS = [
    (
        "foundation: no method, no config",
        (
            "gpart_ds",
            "gpart_ds.errors",
            "gpart_ds.fileio",
            "gpart_ds.hub",
            "gpart_ds.comm",
            "gpart_ds.zero3",
            "gpart_ds.targets",
            "gpart_ds.safetensors_io",
            "gpart_ds.identity",
            "gpart_ds.ownership",
            "gpart_ds.metrics",
            "gpart_ds.objective",
            "gpart_ds.data",
            "gpart_ds.generation",
            "gpart_ds.distributed",
            "gpart_ds.ft",
        ),
    ),
    ("GPart's partition (the hash, counts, scales)", ("gpart_ds.methods.gpart.partition",)),
    ("GPart's torch kernels", ("gpart_ds.methods.gpart.kernels",)),
    (
        "GPart's Triton kernels, on the torch kernels; the linear op",
        ("gpart_ds.methods.gpart.triton", "gpart_ds.methods.gpart.op"),
    ),
    ("GPart's linear op on Triton kernels, on the op", ("gpart_ds.methods.gpart.triton_op",)),
    ("the methods and their registry", ("gpart_ds.methods",)),
    (
        "the library above the methods: config, checkpoint, model, export, planner, trainer",
        (
            "gpart_ds.config",
            "gpart_ds.checkpoint",
            "gpart_ds.model",
            "gpart_ds.export",
            "gpart_ds.plan",
            "gpart_ds.dryrun",
            "gpart_ds.runcheck",
            "gpart_ds.topology",
            "gpart_ds.commcount",
            "gpart_ds.frozen_shards",
            "gpart_ds.evaluate",
            "gpart_ds.serve",
            "gpart_ds.preflight",
            "gpart_ds.trainer",
            "gpart_ds.assets",
        ),
    ),
    ("the entry points: launch scripts (they need the package only)", ("launch",)),
    ("the experiments: study, lr fit, benchmarks", ("experiments",)),
]


def _module_name(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_main_guard(node) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(t, ast.Compare)
        and isinstance(t.left, ast.Name)
        and t.left.id == "__name__"
        and len(t.comparators) == 1
        and isinstance(t.comparators[0], ast.Constant)
        and t.comparators[0].value == "__main__"
    )


def _import_nodes(tree: ast.AST, top_level_only: bool):
    if top_level_only:
        yield from tree.body
        return
    todo = [tree]
    while todo:
        node = todo.pop()
        if _is_main_guard(node):
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _imports(path: Path, top_level_only: bool = False, root: Path = REPO, known: set[str] | None = None) -> set[str]:
    """Modules of ROOTS imported by a file (relative imports resolved, the packages a
    dotted import runs included; a launch script's `import lock` is launch/lock.py)."""
    known = _all_modules(root) if known is None else known
    tree = ast.parse(path.read_text())
    mod = _module_name(path, root)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in _import_nodes(tree, top_level_only):
        if isinstance(node, ast.Import):
            for a in node.names:  # launch/ is a folder of scripts: `import lock` is its sibling
                sibling = f"{pkg}.{a.name}"
                out.add(sibling if pkg == "launch" and sibling in known else a.name)
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
            found = {m for m in subs if m in known}
            out |= found if len(found) == len(subs) else found | {target}
    mine = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 2)}
    for m in list(out):  # the packages a dotted import runs first
        parts = m.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts))} - mine
    return {m for m in out if m in known and m != mod}


def _files(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for r in ROOTS if (root / r).is_dir() for p in (root / r).rglob("*.py")}


def _all_modules(root: Path) -> set[str]:
    return set(_files(root))


def _graph(root: Path = REPO, top_level_only: bool = False) -> dict[str, set[str]]:
    files = _files(root)
    known = set(files)
    return {name: _imports(path, top_level_only, root, known) for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module (Tarjan), as one cycle
    through it: [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    out = []
    for comp in comps:  # a path from the first module back to itself, inside the component
        inside, start = set(comp), comp[0]
        prev, todo = {start: None}, [start]
        while todo:
            v = todo.pop(0)
            for w in sorted(graph[v] & inside):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    out.append(path[::-1] + [start])
                    todo = []
                    break
                if w not in prev:
                    prev[w] = v
                    todo.append(w)
    return out


def _layer(module: str) -> int:
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{module} belongs to no layer of tests/test_house.py:LAYERS"
    return found


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
        for a, targets in graph.items()
        for b in targets
        if _layer(b) > _layer(a)
    )


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 60 and sum(map(len, graph.values())) > 150  # the walk saw everything
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_import_points_down_the_layers():
    upward = _upward(_graph())
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_the_graph_sees_imports_inside_functions_and_finds_a_cycle(tmp_path):
    # mutation check: a cycle closed by an import inside a function, through a package's
    # __init__, fails the test above and is named
    pkg = tmp_path / "gpart_ds"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub.c import g\n    return g\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import a\n")
    (pkg / "sub" / "c.py").write_text("g = 1\n")
    (pkg / "main_only.py").write_text("if __name__ == '__main__':\n    from gpart_ds import a\n")
    graph = _graph(tmp_path)
    assert graph["gpart_ds.b"] == {"gpart_ds.sub", "gpart_ds.sub.c"}
    assert graph["gpart_ds.main_only"] == set()
    assert _cycles(graph) == [["gpart_ds.a", "gpart_ds.b", "gpart_ds.sub", "gpart_ds.a"]]
    assert _cycles(_graph(tmp_path, top_level_only=True)) == []  # what the old, top-level-only test saw
    with pytest.raises(AssertionError, match="gpart_ds.a -> gpart_ds.b -> gpart_ds.sub -> gpart_ds.a"):
        cycles = _cycles(graph)
        assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
    # and each cycle the repository once had is found when put back
    real = _graph()
    for a, b in [
        ("gpart_ds.config", "gpart_ds.methods"),
        ("gpart_ds.methods.gpart.kernels", "gpart_ds.methods.gpart.triton"),
        ("gpart_ds.methods.gpart.op", "gpart_ds.methods.gpart.triton_op"),
        ("gpart_ds.plan.memory", "gpart_ds.plan.step"),
    ]:
        low, high = sorted((a, b), key=_layer)
        mutated = {k: set(v) for k, v in real.items()}
        mutated[high].add(low)
        mutated[low].add(high)
        assert any({a, b} <= set(c) for c in _cycles(mutated)), (a, b)
        assert _upward(mutated) or _layer(a) == _layer(b), (a, b)  # plan.memory, plan.step: one layer, no cycle


def test_the_library_and_the_entry_points_never_import_the_experiments():
    # an installed package has no experiments/ folder: launch/train.py's `prepare:` runs
    # gpart_ds/assets/
    offenders = {
        _module_name(p): sorted(m for m in _imports(p) if m.split(".")[0] == "experiments")
        for p in list(PKG.rglob("*.py")) + list((REPO / "launch").glob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}


def _method_name_comparisons(path: Path, names: set[str]) -> list[str]:
    """Lines that compare something with a method's name (`x == "gpart"`, `in ("lora", ...)`)."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            consts = [
                c
                for c in [node.left, *node.comparators]
                for c in (c.elts if isinstance(c, (ast.Tuple, ast.List, ast.Set)) else [c])
                if isinstance(c, ast.Constant) and c.value in names
            ]
            if consts:
                hits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return hits


def test_no_method_branches_outside_the_methods():
    from gpart_ds import methods

    names = set(methods.names())
    files = [
        p
        for p in list(PKG.rglob("*.py"))
        + list((REPO / "experiments").rglob("*.py"))
        + list((REPO / "launch").glob("*.py"))
        if "methods" not in p.relative_to(REPO).parts
    ]
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


@pytest.mark.parametrize("name", ["gpart", "lora", "vera", "full"])
def test_every_method_implements_the_interface(name):
    """Each method's three parts live in its folder: its config (the keys it reads), its cost
    (what the planner asks) and its run (a Method); both bound to its own config."""
    from gpart_ds import methods
    from gpart_ds.methods.base import Method, MethodConfig
    from gpart_ds.methods.cost import Cost
    from gpart_ds.plan import spec

    cls = methods.REGISTRY[name]
    assert cls.name == name == cls.config_class().name
    assert issubclass(cls.config_class, MethodConfig) and issubclass(cls.cost_class, Cost)
    assert cls.config_class.__module__ == f"gpart_ds.methods.{name}.config"
    assert cls.cost_class.__module__ == f"gpart_ds.methods.{name}.cost"
    assert cls.build is not Method.build, f"{name} lacks build"
    for hook in ("trainable_sizes", "plan_rows", "step_flops", "step_traffic"):
        assert getattr(cls.cost_class, hook) is not getattr(Cost, hook), f"{name} lacks {hook}"
    m = spec(name, d=1024)
    method, cost = methods.create(m), methods.cost(m)
    assert type(method.cfg) is type(cost.cfg) is cls.config_class and method.label == cost.label
    assert method.auto_lr(10**6) > 0  # a calibrated rate for every method (train.lr: auto)
    assert set(cls.drift_keys) <= cls.config_keys == {f.name for f in dataclasses.fields(cls.config_class)}


def test_the_method_section_is_assembled_from_the_methods_configs():
    from gpart_ds import methods
    from gpart_ds.config import MethodConfig

    fields = {f.name: f for f in dataclasses.fields(MethodConfig)}
    assert set(fields) == set().union(*(c.keys() for c in methods.configs().values()))
    assert fields["seed"].metadata["readers"] == ("gpart", "vera")
    assert fields["seed"].metadata["help"] == "gpart: partition seed in [0, 2^64); vera: projection seed"
    assert fields["target_modules"].metadata["help"].startswith("'all-linear'")  # said once: all say it


def test_the_configuration_reference_is_generated_from_the_schema():
    from gpart_ds.config import schema_markdown

    doc = REPO / "docs" / "configuration.md"
    assert doc.read_text() == schema_markdown(), (
        "docs/configuration.md is stale: python -m gpart_ds.config --markdown > docs/configuration.md"
    )


def _ruff(*args: str):
    import shutil
    import subprocess
    import sys

    ruff = Path(sys.executable).parent / "ruff"
    exe = str(ruff) if ruff.is_file() else shutil.which("ruff")
    assert exe, "ruff is not installed: pip install -e '.[dev]' (launch/lock/cpu.txt pins it)"
    return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    """The linter (pyproject.toml [tool.ruff]: pycodestyle, pyflakes, isort, bugbear,
    pyupgrade) over the whole repository, with the venv's ruff (the dev extra, locked)."""
    proc = _ruff("check", "--no-cache", "--output-format", "concise", ".")
    assert proc.returncode == 0, (
        f"ruff check found problems (ruff check --fix . mends the [*] ones):\n"
        f"{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    )


def test_ruff_format_leaves_every_file_as_it_is():
    """One layout for every file (ruff format, pyproject.toml [tool.ruff]): a diff shows
    what changed, never how it was laid out."""
    proc = _ruff("format", "--check", "--no-cache", ".")
    assert proc.returncode == 0, (
        f"files not formatted (ruff format . mends them):\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    )
