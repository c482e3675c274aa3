"""The package's layers: imports flow one way (commands -> training, decoding, server ->
workdir -> model, data -> ground): a module imports only from its own package or a lower
layer, never from a sibling package of its layer."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "charlm_jax"
# Each top-level module or package of charlm_jax and its layer; a module may import only
# from a lower layer, or from its own package.
LAYERS = {
    "errors": 0,
    "config_defaults": 1,
    "data": 2, "model": 2,
    "workdir": 3,
    "training": 4, "decoding": 4,
    "server": 5,
    "cli": 6,  # what the commands share
    "main": 7, "generate": 7, "serve": 7, "plot": 7, "prune": 7, "quantize": 7, "export": 7,
    "sampling": 7, "checkpoints": 7,  # re-exports of the documented imports
}  # fmt: skip


def unit(path: Path) -> str:
    """The top-level module or package of charlm_jax that `path` belongs to."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_units(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "charlm_jax":
                continue
            if len(parts) > 1:
                units.add(parts[1])
            else:  # from charlm_jax import a, b
                units.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            units.update(
                a.name.split(".")[1] for a in node.names if a.name.startswith("charlm_jax.")
            )
    return units


def test_every_unit_has_a_layer():
    units = {unit(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units == set(LAYERS)


def test_imports_flow_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        mine = unit(path)
        for other in imported_units(path) - {mine}:
            if LAYERS[other] >= LAYERS[mine]:
                wrong.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not wrong
