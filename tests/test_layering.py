"""The package's layers: the command line is a skin over the library, never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

import weightsmith

PACKAGE = Path(weightsmith.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_library_module_imports_the_cli():
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(m for m in _imported_modules(path) if m.startswith("weightsmith.cli"))
        for path in PACKAGE.rglob("*.py")
        if "cli" not in path.relative_to(PACKAGE).parts
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_scan_sees_an_import_of_the_cli(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from weightsmith.cli.common import add_command\n")
    assert "weightsmith.cli.common" in _imported_modules(module)
