"""The names the package exports are the intended ones, and the layering holds."""

from __future__ import annotations

import ast
from pathlib import Path

import laulima

SRC = Path(laulima.__file__).parent


def test_top_level_exports_are_the_intended_ones():
    assert sorted(laulima.__all__) == sorted(
        ["Algorithm", "Evaluation", "LaulimaError", "SiteContext", "TrainConfig", "Update", "__version__"]
    )
    for name in laulima.__all__:
        assert hasattr(laulima, name)


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return found


def test_core_imports_no_other_laulima_layer_and_no_io_libraries():
    bad = {m for m in _imports("core") if m.startswith(("laulima.hub", "laulima.site", "laulima.algorithms"))}
    bad |= {m for m in _imports("core") if m.split(".")[0] in {"httpx", "sqlalchemy", "fastapi", "uvicorn", "os"}}
    assert not bad, f"core must stay pure: {bad}"


def test_site_never_imports_the_hub_and_the_hub_never_imports_training_code():
    assert not {m for m in _imports("site") if m.startswith("laulima.hub")}
    assert not {m for m in _imports("hub") if m.startswith(("laulima.site", "laulima.algorithms"))}
