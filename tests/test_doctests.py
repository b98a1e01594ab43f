"""The docstring examples of the package run: every module imports (CLI modules and those whose optional
dependencies load lazily included), and each example not marked ``+SKIP`` runs with ``torch``, ``ws`` and
``weightsmith`` in scope. Examples that need files they cannot make are marked ``+SKIP``."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest
import torch

import weightsmith

PACKAGE = Path(weightsmith.__file__).parent
SOURCES = {
    ".".join(("weightsmith", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
    for path in PACKAGE.rglob("*.py")
    if path.name != "__main__.py"
}
MODULES = sorted(SOURCES)
WITH_EXAMPLES = [name for name in MODULES if ">>>" in SOURCES[name].read_text(encoding="utf-8")]


def test_every_module_imports():
    failed = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every module that fails, not only the first
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    assert not failed, "; ".join(failed)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes relative paths writes here
    module = importlib.import_module(name)
    globs = {"torch": torch, "ws": weightsmith, "weightsmith": weightsmith}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, extraglobs=globs):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (output above)"
