"""The CLI's choices are the library's registries: a method, scheme or task the library gains or loses shows in
--help, and a choice the CLI offers is one the library accepts."""

from __future__ import annotations

import argparse

import pytest

from weightsmith.cli import build_parser


def _choices(*path: str, flag: str) -> tuple[str, ...]:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    action = next(a for a in parser._actions if flag in a.option_strings)
    assert action.choices is not None, f"{' '.join(path)} {flag}: no choices"
    return tuple(action.choices)


def _library(table: str):
    module, name = table.split(":")
    value = getattr(__import__(module, fromlist=[name]), name)
    return tuple(value)


@pytest.mark.parametrize(
    "path, flag, table",
    [
        (("merge",), "--method", "weightsmith.merge.config:METHODS"),
        (("export", "onnx"), "--task", "weightsmith.export.to_onnx:TASKS"),
        (("export", "onnx"), "--quantize", "weightsmith.export.to_onnx:QUANTIZE"),
        (("prune",), "--method", "weightsmith.compress.prune.unstructured:METHODS"),
        (("prune",), "--scope", "weightsmith.compress.prune.unstructured:SCOPES"),
        (("prune",), "--structured", "weightsmith.compress.prune:STRUCTURED"),
    ],
)
def test_cli_choices_equal_the_library_registry(path, flag, table):
    assert sorted(_choices(*path, flag=flag)) == sorted(_library(table))
