"""Imports go one way: io < ops < datasets < methods < platform < tuning < cli. A lower layer
never imports a higher one (not even inside a function), and Ray stays in platform and tuning.
`wsss.io` (files, URIs, DataError) is the bottom: it imports no other wsss module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "wsss"
LAYERS = ("io", "ops", "datasets", "methods", "platform", "tuning", "cli")


def layer(module: str) -> str | None:
    """'wsss.platform.train' -> 'platform'; None outside wsss or for the package itself."""
    parts = module.split(".")
    if parts[0] != "wsss" or len(parts) < 2:
        return None
    return "cli" if parts[1] in ("cli", "__main__") else parts[1]


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if layer(module_name(p)) is not None)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


@pytest.mark.parametrize("path", modules(), ids=lambda p: module_name(p))
def test_a_module_imports_only_its_own_layer_and_those_below(path):
    own = layer(module_name(path))
    for imported in imports(path):
        target = layer(imported)
        if target is not None and target in LAYERS:
            assert LAYERS.index(target) <= LAYERS.index(own), f"{module_name(path)} ({own}) imports {imported}"
        if imported.split(".")[0] == "ray":
            assert own in ("platform", "tuning"), f"{module_name(path)} imports Ray"


def test_every_subpackage_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LAYERS), f"add {sorted(packages - set(LAYERS))} to LAYERS"


def test_every_top_level_module_has_a_layer():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert {layer(f"wsss.{name}") for name in top} <= set(LAYERS), f"add {sorted(top)} to LAYERS"


def test_the_ignore_label_is_defined_once():
    """Every module imports IGNORE_INDEX from wsss.datasets.base; none names 255 for itself."""
    found = []
    for path in modules():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value == 255:
                found.append(f"{module_name(path)}: {ast.unparse(node)}")
    assert found == ["wsss.datasets.base: IGNORE_INDEX = 255"]
