"""The layering: the library (lra_dtn) below, tasks and models on it, the application (lra_dtn.app) on
top; no import cycles, at module level or hidden inside functions; the results code without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lra_dtn", "tasks", "models")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (function-level imports included);
    ``from a import b`` counts as ``a.b`` when that is a module, else as ``a``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


GRAPH = {name: imports_of(path, project_modules()) for name, path in project_modules().items()}


def layer(module: str) -> int:
    """0: the library, 1: tasks and models, 2: the application."""
    if module == "lra_dtn.app" or module.startswith("lra_dtn.app."):
        return 2
    return 0 if module.split(".")[0] == "lra_dtn" else 1


def test_the_graph_sees_every_layer():
    # Guards the test itself: a parser that found no edges would pass everything below.
    assert "tasks.base" in GRAPH["tasks.listops"] and "lra_dtn.data" in GRAPH["tasks.base"]
    assert "lra_dtn.app.engine" in GRAPH["lra_dtn.app.sweep"] and "models" in GRAPH["lra_dtn.app.engine"]
    assert {layer("lra_dtn.norms"), layer("models.blocks"), layer("lra_dtn.app.cli")} == {0, 1, 2}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_layer_above_its_own(module):
    above = sorted(dep for dep in GRAPH[module] if layer(dep) > layer(module))
    assert not above, f"{module} (layer {layer(module)}) imports {above}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("module", ["lra_dtn", "lra_dtn.app.tables", "lra_dtn.app.results", "lra_dtn.app.plots",
                                    "lra_dtn.config", "lra_dtn.registry"])
def test_reading_results_does_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
