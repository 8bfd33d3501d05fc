"""The package's imports form no cycle and no arrow runs back up the layers.

Every import counts: at module level, inside functions, and under ``if TYPE_CHECKING:`` (a cycle a
function-level or type-only import hides is still two modules that cannot be read apart). Importing
``diffusers_am.a.b`` also runs ``diffusers_am/a/__init__.py``, so it counts as importing ``diffusers_am.a``
too (unless the importer sits inside ``a`` itself).

The layers, lowest first (:data:`LAYERS`, also in docs/architecture.md): a top-level module or
subpackage imports only from its own layer or the ones below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import diffusers_am

PACKAGE = Path(diffusers_am.__file__).resolve().parent
ROOT = "diffusers_am"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "jsonio", "filemode", "deprecation", "bnb", "checks"),  # helpers that import nothing else of the package
    ("adjoint", "control", "schedules", "flow", "batching", "objectives", "probe", "truncation", "calibration"),
    ("toy",),  # the toy flows and classifiers (the digits / shapes testbeds), on the method core
    ("pipelines",),  # diffusers pipelines and the networks only they hold (the SiT transformer)
    ("models",),  # model adapters: a pipeline seen as a flow in paper time
    ("rewards", "prompts"),
    ("metrics", "sampling"),
    ("training",),
    ("evaluate", "train", "launch"),  # the entry points
)
"""Top-level modules and subpackages of ``diffusers_am``, lowest layer first: the method core is pure torch,
pipelines know nothing of the model adapters built on them, the trainer and the entry points sit on top."""


def module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([ROOT, *parts])] = path
    return out


def all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module: module level, functions, methods, ``if TYPE_CHECKING:`` bodies."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def import_targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The package modules one import statement loads (``from . import x`` -> the submodule x; ``import a.b.c``
    -> the deepest package module named)."""
    if isinstance(node, ast.Import):
        out = set()
        for alias in node.names:
            name = alias.name
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
        return out
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in modules:
            out.add(sub)
        elif source in modules:
            out.add(source)
    return out


def _packages_above(module: str) -> set[str]:
    """``diffusers_am.a.b.c`` -> {``diffusers_am.a``, ``diffusers_am.a.b``} (the root package imports nothing)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts))}


def graph_of(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, from {module: (source text, is_package)}; an import of
    ``a.b`` adds the package ``a`` unless the importer lies inside ``a``."""
    modules = set(sources)
    graph = {}
    for name, (text, is_package) in sources.items():
        targets: set[str] = set()
        for node in all_imports(ast.parse(text)):
            targets |= import_targets(name, is_package, node, modules)
        inside = _packages_above(name) | ({name} if is_package else set())
        for target in list(targets):
            targets |= {p for p in _packages_above(target) if p in modules and p not in inside}
        graph[name] = targets - {name}
    return graph


def import_graph() -> dict[str, set[str]]:
    return graph_of({name: (path.read_text(), path.name == "__init__.py") for name, path in module_names().items()})


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    colour = {n: 0 for n in graph}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == 0:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def top_level(module: str) -> str:
    """``diffusers_am.models.sit`` -> ``models``; the root package -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def arrows_back_up(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """``"a -> b (layer i -> j)"`` for every import from a module to one in a higher layer."""
    layer = {name: i for i, names in enumerate(layers) for name in names}
    return [
        f"{a} -> {b} (layer {layer[top_level(a)]} -> {layer[top_level(b)]})"
        for a in sorted(graph)
        for b in sorted(graph[a])
        if top_level(a) in layer and top_level(b) in layer and layer[top_level(b)] > layer[top_level(a)]
    ]


def test_graph_sees_relative_type_checking_function_and_package_imports():
    sources = {
        "diffusers_am.a": ("", True),
        "diffusers_am.a.x": ("from . import y\n", False),
        "diffusers_am.a.y": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .z import Z\n", False),
        "diffusers_am.a.z": ("def f():\n    from ..b.w import g\n    return g\n", False),
        "diffusers_am.b": ("import diffusers_am.a.x\n", True),
        "diffusers_am.b.w": ("import torch\n", False),
    }
    graph = graph_of(sources)
    assert graph["diffusers_am.a.x"] == {"diffusers_am.a.y"}  # the sibling; its own package is not an edge
    assert graph["diffusers_am.a.y"] == {"diffusers_am.a.z"}  # under TYPE_CHECKING
    assert graph["diffusers_am.a.z"] == {"diffusers_am.b.w", "diffusers_am.b"}  # in a function; b/__init__ runs
    assert graph["diffusers_am.b"] == {"diffusers_am.a.x", "diffusers_am.a"}
    assert graph["diffusers_am.b.w"] == set()
    assert find_cycle(graph) == ["diffusers_am.a.x", "diffusers_am.a.y", "diffusers_am.a.z", "diffusers_am.b",
                                 "diffusers_am.a.x"]
    real = import_graph()
    assert "diffusers_am.models.lora" in real["diffusers_am.models.base"]  # `from . import lora as _lora`


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_arrows_back_up_finds_an_upward_import():
    layers = (("flow",), ("pipelines",), ("models",))
    before = {  # the SiT layout before the transformer moved next to its pipeline
        "diffusers_am.models.sit": {"diffusers_am.pipelines.sit", "diffusers_am.flow"},
        "diffusers_am.pipelines.sit": {"diffusers_am.models.sit_transformer"},
        "diffusers_am.models.sit_transformer": set(),
    }
    assert arrows_back_up(before, layers) == [
        "diffusers_am.pipelines.sit -> diffusers_am.models.sit_transformer (layer 1 -> 2)"
    ]
    after = {
        "diffusers_am.models.sit": {"diffusers_am.pipelines.sit", "diffusers_am.flow"},
        "diffusers_am.pipelines.sit": {"diffusers_am.pipelines.sit_transformer"},
        "diffusers_am.pipelines.sit_transformer": set(),
    }
    assert arrows_back_up(after, layers) == []


def test_every_top_level_module_has_one_layer():
    placed = [name for names in LAYERS for name in names]
    assert len(placed) == len(set(placed)), "a name sits in two layers"
    present = {top_level(m) for m in module_names()} - {""}
    assert present - set(placed) == set(), "place each new top-level module in LAYERS (and docs/architecture.md)"
    assert set(placed) - present == set(), "LAYERS names a module that does not exist"


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_runs_back_up_the_layers():
    upward = arrows_back_up(import_graph(), LAYERS)
    assert upward == [], "imports from a higher layer:\n" + "\n".join(upward)
