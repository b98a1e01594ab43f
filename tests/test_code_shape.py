"""The package's shape: no function longer than 80 lines (split long ones into named parts)."""

from __future__ import annotations

import ast
from pathlib import Path

import weightsmith

LIMIT = 80
PACKAGE = Path(weightsmith.__file__).parent


def _lengths(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (f"{node.name} (line {node.lineno})", node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None
    ]


def test_no_function_is_longer_than_the_limit():
    long = [
        f"{path.relative_to(PACKAGE).as_posix()}: {name} has {n} lines"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, n in _lengths(path)
        if n > LIMIT
    ]
    assert not long, f"functions over {LIMIT} lines: " + "; ".join(long)


def test_the_measure_counts_every_line_of_a_function(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n" + "    x = 1\n" * (LIMIT + 1) + "\n\nclass C:\n    def g(self):\n        pass\n")
    assert _lengths(source) == [("f (line 1)", LIMIT + 2), (f"g (line {LIMIT + 6})", 2)]
