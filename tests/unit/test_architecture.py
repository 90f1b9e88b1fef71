"""The package's shape: imports point down the layers of docs/architecture.md; the core needs no Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lightning_sharing

PACKAGE = Path(lightning_sharing.__file__).parent
# Bottom to top; a module may import its own layer and the layers before it.
LAYERS = ["errors", "_version", "_faults", "core", "format", "storage", "distributed", "sharded", "engine",
          "statefuls", "integration", "lightning", "fabric", "_registration", "cli", "__init__"]
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
    # One sanctioned exception: CheckpointManifest.load, a convenience on a data class, reads through storage.
    wrong = [w for w in wrong if not w.startswith("format/manifest.py") or "lightning_sharing.storage" not in w]
    assert wrong == [], "\n".join(wrong)


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
