"""The package's shape: imports point down the layers of docs/architecture.md; the core needs no Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lightning_sharing

PACKAGE = Path(lightning_sharing.__file__).parent
# Bottom to top; a module may import its own layer and the layers before it.
LAYERS = ["errors", "_version", "_faults", "core", "format", "storage", "checkpoint", "distributed", "sharded",
          "engine", "statefuls", "integration", "lightning", "fabric", "_registration", "cli", "__init__"]
# Same height: neither may import the other.
PEERS = {frozenset({"lightning", "fabric"})}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``lightning_sharing`` module imported by ``path`` at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(node.lineno, n) for n in names[:1] if n.startswith("lightning_sharing")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("lightning_sharing")]
    return found


def test_every_module_belongs_to_a_layer():
    unknown = sorted({_layer("lightning_sharing." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts))
                      for p in PACKAGE.rglob("*.py")} - set(LAYERS))
    assert unknown == [], f"modules outside the layers of docs/architecture.md: {unknown}"


def test_imports_point_down_the_layers():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        here = _layer("lightning_sharing." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for line, module in _imports(path):
            there = _layer(module)
            if module == "lightning_sharing" and here != "__init__":
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports the top-level package")
            elif there in LAYERS and (LAYERS.index(there) > LAYERS.index(here)
                                      or frozenset({here, there}) in PEERS):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({here}) imports {module} ({there})")
    assert wrong == [], "\n".join(wrong)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(("lightning_sharing", *parts))


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    # The top-level package imports its names lazily (PEP 562) and nothing imports it: it cannot close a circle.
    graph = _import_graph()
    assert _cycles(graph) == [], "modules importing each other (also through imports inside functions)"


def test_the_circle_check_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_import_does_not_load_lightning():
    code = "import lightning_sharing, sys; print('lightning' in sys.modules, 'lightning.pytorch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_strategy_names_register_whatever_the_import_order():
    code = ("import lightning_sharing\n"
            "from lightning.pytorch.strategies import StrategyRegistry\n"
            "from lightning.fabric.strategies import STRATEGY_REGISTRY\n"
            "print('sharing' in StrategyRegistry, 'sharing' in STRATEGY_REGISTRY)\n")
    for first in ("", "import lightning\n"):
        out = subprocess.run([sys.executable, "-c", first + code], capture_output=True, text=True, check=True).stdout
        assert out.split()[-2:] == ["True", "True"], (first, out)


def test_lightning_names_are_importable_from_the_top_level():
    from lightning_sharing import BuiltinState, FabricSharingStrategy, SharingCheckpointIO, SharingStrategy

    assert SharingStrategy.strategy_name == "sharing"
    assert {BuiltinState.__name__, FabricSharingStrategy.__name__, SharingCheckpointIO.__name__} == {
        "BuiltinState", "FabricSharingStrategy", "SharingCheckpointIO"}


def test_a_metric_declared_as_it_is_is_wrapped_in_a_fresh_process():
    # The package imports its names lazily; the first one still registers the MetricState adapter.
    code = ("import torchmetrics\nfrom lightning_sharing import StateComponent\n"
            "print(type(StateComponent('m', torchmetrics.SumMetric(), 'per_rank').stateful).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["MetricState"]
