"""Library errors name parameters; the CLI spells each as its flag."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import weightsmith as ws
from weightsmith.cli import build_parser, flag_spellings, main, spell_flags
from weightsmith.errors import ConfigError

PACKAGE = Path(ws.__file__).parent


def _raised_texts(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            parts = [p.value for p in ast.walk(node.exc) if isinstance(p, ast.Constant) and isinstance(p.value, str)]
            yield node.lineno, "".join(parts)


def test_no_library_error_names_a_cli_flag():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        for line, text in _raised_texts(ast.parse(path.read_text())):
            if re.search(r"(?<![\w-])--[a-z]", text) and "hf download" not in text:  # the Hub CLI's own flags
                offenders.append(f"{path.relative_to(PACKAGE)}:{line}: {text!r}")
    assert not offenders, "\n".join(offenders)


def test_every_backticked_parameter_in_a_library_error_is_a_flag_somewhere():
    flags = flag_spellings(build_parser())
    unknown = set()
    for path in PACKAGE.rglob("*.py"):
        for _, text in _raised_texts(ast.parse(path.read_text())):
            unknown |= {name for name in re.findall(r"`([a-z_]+)`", text) if name not in flags}
    assert not unknown, f"parameters named in errors with no CLI flag: {sorted(unknown)}"


def test_library_caller_reads_the_parameter_and_the_cli_reads_the_flag(tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    with pytest.raises(ConfigError) as caught:
        ws.prune(src, tmp_path / "a", structured="heads", ratio=0.5, keep_heads=2)
    assert str(caught.value) == "give `ratio` or `keep_heads`, not both"
    code = main(["prune", str(src), "-o", str(tmp_path / "b"), "--structured", "heads", "--ratio", "0.5",
                 "--keep-heads", "2"])  # fmt: skip
    assert code == 2 and "give --ratio or --keep-heads, not both" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_spelling_leaves_unknown_names_and_plain_text_alone():
    flags = {"force": "--force", "keep_heads": "--keep-heads"}
    assert (
        spell_flags("set `force`; `keep_heads`; `other`; {a} --x", flags)
        == "set --force; --keep-heads; `other`; {a} --x"
    )
