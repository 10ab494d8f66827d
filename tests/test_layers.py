"""The import rule of CONTRIBUTING.md: sae/ imports only downward, from the scripts to sae/util, and has no cycles.

Every import is counted, also those inside functions and under TYPE_CHECKING: a lazy import is still a
dependency of the module that makes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAE = ROOT / "sae"

# rank of each layer: a module may import its own subpackage or a layer of lower rank (nn and data: neither
# imports the other); the entry points may import everything, the root scripts included
RANKS = {"util": 0, "nn": 1, "data": 1, "encoders": 2, "analysis": 3, "viz": 4, "pipeline": 5, "__init__": 5}
ENTRY_POINTS = {"demo", "__main__"}  # `python -m sae demo` runs the root scripts as a user would
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the project modules (sae.* and root scripts) that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from sae.encoders import registry` imports the submodule sae.encoders.registry
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in SCRIPTS or (name.startswith("sae.") and _exists(name)) or name == "sae":
                found.add(name)
    return found


def _exists(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _layer(module: str) -> str:
    """'nn' for sae.nn.model, 'pipeline' for sae.pipeline, 'script' for a root script."""
    parts = module.split(".")
    if parts[0] != "sae":
        return "script"
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) - {_module_name(p)} for p in sorted(SAE.rglob("*.py"))}


def test_graph_sees_the_imports() -> None:
    graph = _graph()
    assert len(graph) > 30
    assert "sae.util.errors" in graph["sae.nn.sources"]
    assert "sae.encoders.registry" in graph["sae.pipeline"]  # `from sae.encoders import registry`
    assert {"show", "wmppc"} <= graph["sae.demo"]  # lazy imports inside a function count


def _violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in graph.items():
        layer = _layer(module)
        if layer in ENTRY_POINTS:
            continue
        for dep in deps:
            dep_layer = _layer(dep)
            if dep_layer == layer or dep == "sae":
                continue
            if dep_layer == "script" or dep_layer in ENTRY_POINTS or RANKS[dep_layer] >= RANKS[layer]:
                bad.append(f"{module} ({layer}) imports {dep} ({dep_layer})")
    return bad


def test_imports_go_down_only() -> None:
    assert _violations(_graph()) == []


def test_an_upward_import_is_caught() -> None:
    graph = _graph()
    graph["sae.nn.model"] = graph["sae.nn.model"] | {"sae.data.cache"}
    graph["sae.data.cache"] = graph["sae.data.cache"] | {"wrappedmodels"}
    assert sorted(_violations(graph)) == [
        "sae.data.cache (data) imports wrappedmodels (script)",
        "sae.nn.model (nn) imports sae.data.cache (data)",
    ]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the sae modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle() -> None:
    graph = _graph()
    assert _cycle(graph) is None
    graph["sae.viz.previews"] = graph["sae.viz.previews"] | {"sae.viz.browser"}
    assert _cycle(graph) == ["sae.viz.browser", "sae.viz.previews", "sae.viz.browser"]
