"""The package's dependency rule, checked on its source: layers point one way, no cycles, no private names shared.

Layers, bottom to top (a module may import its own layer and the ones below, never one above):
    0  config, errors                        the typed config tree and the error types: no package imports
    1  storage, capacity                     files and URIs, Ray resources
    2  data/, models, gguf, logprobs, loss,  the data flow's building blocks: read -> validate -> tokenize ->
       generate                              reference log-probs, and the one log-prob function
    3  train/, runtime, shared_storage       DeepSpeed workers under Ray Train; Ray start-up
    4  pipeline, sweep/, eval/, sft, toy     the commands' bodies
    5  cli, __main__                         the command line
Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = "hdpo_ray"
LAYERS = {
    "config": 0,
    "config_reference": 0,
    "errors": 0,
    "storage": 1,
    "capacity": 1,
    "data": 2,
    "models": 2,
    "gguf": 2,
    "logprobs": 2,
    "loss": 2,
    "generate": 2,
    "train": 3,
    "runtime": 3,
    "shared_storage": 3,
    "pipeline": 4,
    "sweep": 4,
    "eval": 4,
    "sft": 4,
    "toy": 4,
    "cli": 5,
    "__main__": 5,
}


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> list[tuple[str, str, str]]:
    """(importer, imported module, imported name or "") for every package-internal import under root."""
    modules = {module_name(root, p) for p in root.rglob("*.py")}
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(root, path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(importer, a.name, "") for a in node.names if a.name.split(".")[0] == root.name]
            elif (
                isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == root.name
            ):
                for alias in node.names:  # `from pkg.sub import module` imports a module, not a name
                    submodule = f"{node.module}.{alias.name}"
                    found.append(
                        (importer, submodule, "") if submodule in modules else (importer, node.module, alias.name)
                    )
    return [(a, b, name) for a, b, name in found if a != b]


def layer(module: str) -> int | None:
    parts = module.split(".")[1:]
    return LAYERS.get(parts[0]) if parts else None


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(root: Path) -> list[str]:
    """Every breach of the rule in the package at root, one line each."""
    found = imports(root)
    problems = []
    for importer, module, name in found:
        # A package's __init__ is named by its folder: compare parent packages only when both have a layer.
        below, above = layer(importer), layer(module)
        if below is None and importer != root.name:
            problems.append(f"{importer}: not in any layer (add it to LAYERS)")
        elif above is not None and below is not None and above > below:
            problems.append(f"upward import: {importer} (layer {below}) imports {module} (layer {above})")
        if is_private(name) or any(is_private(part) for part in module.split(".")[1:]):
            problems.append(f"private name: {importer} imports {name or module} from {module}")
    problems += [f"import cycle: {' <-> '.join(c)}" for c in cycles({(a, b) for a, b, _ in found})]
    return sorted(set(problems))


def test_the_package_keeps_the_dependency_rule():
    assert violations(REPO / PACKAGE) == []


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / PACKAGE


CLEAN = {
    "__init__.py": "",
    "config.py": "X = 1\n",
    "data/__init__.py": "",
    "data/read.py": "from hdpo_ray.config import X\n",
    "train/__init__.py": "",
    "train/loop.py": "def f():\n    from hdpo_ray.data import read\n    return read\n",
}


@pytest.mark.parametrize(
    ("planted", "expected"),
    [
        ({}, []),
        (
            {"data/extra.py": "def g():\n    from hdpo_ray.train.loop import f\n"},
            ["upward import: hdpo_ray.data.extra (layer 2) imports hdpo_ray.train.loop (layer 3)"],
        ),
        (
            {"data/read.py": "from hdpo_ray.data.write import _helper\n", "data/write.py": "def _helper(): ...\n"},
            ["private name: hdpo_ray.data.read imports _helper from hdpo_ray.data.write"],
        ),
        (
            {"data/read.py": "import hdpo_ray.data.write\n", "data/write.py": "from hdpo_ray.data import read\n"},
            ["import cycle: hdpo_ray.data.read <-> hdpo_ray.data.write"],
        ),
        ({"plugins.py": "from hdpo_ray.config import X\n"}, ["hdpo_ray.plugins: not in any layer (add it to LAYERS)"]),
    ],
    ids=["clean", "upward", "private", "cycle", "unlayered"],
)
def test_a_planted_breach_is_found(tmp_path, planted, expected):
    assert violations(write_package(tmp_path, CLEAN | planted)) == expected
