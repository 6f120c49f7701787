"""The package's layers (docs/architecture.md): every import points down, and no module imports
itself round a circle. Parsed from the source, imports inside functions included, so a deferred
import cannot hide an upward arrow."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layer of each module, by the first prefix that matches (longest prefixes first). A new module of
# reproduce/ must be placed here: the test fails on a module it cannot place.
LAYERS = {
    "cli": 4,                 # thin click commands
    "engine.cli": 4,
    "runner": 3,              # the commands' own modules: table, diff, list, plan, figures, ...
    "checks": 3,
    "guards": 3,              # the diff's guard gains: paired timing and the rule that judges them
    "cells": 3,               # a table's cells, one unit per kind (static, throughput, accuracy, settings)
    "coverage": 3,
    "plan": 3,
    "figures": 3,
    "site": 3,
    "submit": 3,
    "verify": 3,
    "registry": 2,            # the shared core: registry, errors, files, provenance, measurement,
    "errors": 2,
    "device": 2,              # the one device resolution: a Device passed down              # the weights manifest, the report writer, and the training engine
    "files": 2,
    "provenance": 2,
    "evidence": 2,
    "measure": 2,
    "op_counters": 2,
    "report": 2,
    "buildable": 2,
    "weights": 2,
    "transforms": 2,
    "engine": 2,
    "": 2,                    # reproduce/__init__.py
}
MODELS = 1                    # riformer/: imports nothing of reproduce/


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in names:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a submodule may import its own package (reproduce.engine.train -> reproduce.engine)
            if target and target != name and not name.startswith(target + "."):
                targets.add(target)
    return targets


def _graph():
    modules = {**_modules("reproduce"), **_modules("riformer")}
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(module: str) -> int:
    if module.split(".")[0] == "riformer":
        return MODELS
    rest = module[len("reproduce."):] if module != "reproduce" else ""
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if rest == prefix or rest.startswith(prefix + ".") or prefix == "" and rest == "":
            return LAYERS[prefix]
    raise KeyError(module)


def test_every_module_has_a_layer():
    unplaced = []
    for module in _graph():
        try:
            _layer(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these modules in tests/test_layers.py LAYERS: {unplaced}"


def test_every_import_points_down_or_across():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in _graph().items() for b in sorted(targets) if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("planted", ["upward", "circle"])
def test_the_checks_fail_on_a_planted_import(planted, monkeypatch):
    """A check that cannot fail proves nothing: plant an upward import and a circle in the graph."""
    graph = _graph()
    if planted == "upward":
        graph["reproduce.measure"] = graph["reproduce.measure"] | {"reproduce.cli"}
        monkeypatch.setitem(globals(), "_graph", lambda: graph)
        with pytest.raises(AssertionError, match="reproduce.measure .* imports reproduce.cli"):
            test_every_import_points_down_or_across()
    else:
        graph["reproduce.files"] = graph["reproduce.files"] | {"reproduce.report"}
        monkeypatch.setitem(globals(), "_graph", lambda: graph)
        with pytest.raises(AssertionError, match="import circles"):
            test_no_import_circles()
