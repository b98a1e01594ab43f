"""The prune CLI: every bad input is one line on stderr, exit 2, and nothing at the destination; examples parse."""

from __future__ import annotations

import pytest
from _prune_utils import CALIBRATION, with_tokenizer, write_lines

from weightsmith import architecture
from weightsmith.cli import build_parser, main


def _refused(capsys, argv, out, needle):
    capsys.readouterr()  # drop what building the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.weightsmith-*"))  # no temporary left behind either


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--sparsity", "1.0"], "must be in [0, 1)"),
        (["--sparsity", "-0.1"], "must be in [0, 1)"),
        ([], "needs --sparsity"),
        (["--pattern", "2:5"], "divisible by 5"),
        (["--pattern", "4:2"], "expected N:M"),
        (["--pattern", "2:4", "--sparsity", "0.3"], "contradicts"),
        (["--sparsity", "0.5", "--scope", "global", "--method", "wanda", "--calibration", "x.txt"], "no global scope"),
        (["--method", "wanda", "--sparsity", "0.5"], "needs --calibration"),
        (["--structured", "ffn"], "needs --ratio"),
        (["--structured", "ffn", "--ratio", "1.0"], "must be in [0, 1)"),
        (["--structured", "heads", "--keep-heads", "3"], "would not load in transformers"),
        (["--structured", "heads", "--keep-heads", "0"], "between 1 and 4"),
        (["--structured", "ffn", "--ratio", "0.5", "--sparsity", "0.5"], "not --sparsity"),
        (["--sparsity", "0.5", "--skip", "("], "not a valid regular expression"),
        (["--structured", "ffn", "--ratio", "0.5", "--method", "wanda"], "--method/--scope do not apply"),
    ],
)
def test_refusals_write_nothing(tiny_model, tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    _refused(capsys, ["prune", str(tiny_model("llama")), "-o", str(out), *flags], out, needle)


def test_refusals_calibration_missing_empty_no_tokenizer(tiny_model, tmp_path, capsys):
    src = with_tokenizer(tiny_model("llama"), tmp_path / "tok")
    out = tmp_path / "out"
    base = ["prune", str(src), "-o", str(out), "--method", "wanda", "--sparsity", "0.5", "--calibration"]
    _refused(capsys, [*base, str(tmp_path / "missing.txt")], out, "calibration file not found")
    (tmp_path / "empty.txt").write_text("\n  \n")
    _refused(capsys, [*base, str(tmp_path / "empty.txt")], out, "calibration file is empty")
    calib = write_lines(tmp_path / "c.txt", CALIBRATION)
    _refused(
        capsys,
        [
            "prune",
            str(tiny_model("llama")),
            "-o",
            str(out),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--calibration",
            str(calib),
        ],
        out,
        "no tokenizer files",
    )
    _refused(
        capsys,
        ["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--eval-data", str(tmp_path / "empty.txt")],
        out,
        "evaluation file is empty",
    )


def test_refusals_unsupported_structured(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(
        capsys,
        ["prune", str(tiny_model("gpt2")), "-o", str(out), "--structured", "ffn", "--ratio", "0.25"],
        out,
        f"structured pruning supports {', '.join(architecture.PRUNE_FAMILIES)} models; this one is gpt2",
    )
    _refused(
        capsys,
        ["prune", str(tiny_model("bert")), "-o", str(out), "--structured", "heads", "--ratio", "0.25"],
        out,
        "head pruning of bert is not supported",
    )
    _refused(
        capsys,
        ["prune", str(tiny_model("mistral")), "-o", str(out), "--structured", "heads", "--keep-heads", "3"],
        out,
        "must be a multiple of 2 (same heads per group) or of 2 (whole groups)",
    )


def test_cli_prunes_and_reports(tiny_model, tmp_path, capsys):
    out, src = tmp_path / "out", str(tiny_model("llama"))
    capsys.readouterr()
    assert main(["prune", src, "-o", str(out), "--pattern", "2:4", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["sparsity_pruned_tensors"] == 0.5 and (out / "config.json").is_file()
    assert all(row["sparsity"] == 0.5 for row in report["tensors"])


def test_help_examples_parse():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["prune"]
    examples = [line.strip() for line in sub.epilog.splitlines() if line.strip().startswith("weightsmith prune")]
    assert len(examples) >= 5
    for example in examples:
        args = parser.parse_args(example.split()[1:])
        assert args.command == "prune" and args.handler is not None
