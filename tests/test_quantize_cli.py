"""quantize/dequantize through the CLI: every refusal is one line, exit 2 and nothing written; examples parse."""

from __future__ import annotations

import json
import shlex

import pytest

from weightsmith.cli import build_parser, main


def _refused(capsys, argv, out, *needles) -> str:
    capsys.readouterr()  # drop the fixtures' own output (transformers' save progress)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("weightsmith: error:"), err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.weightsmith-*"))  # no temporary directory left behind
    return err


def test_refuses_an_already_quantized_checkpoint(tiny_model, tmp_path, capsys):
    assert main(["quantize", str(tiny_model("llama")), "-o", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    for scheme in ("int8", "nf4"):
        _refused(
            capsys,
            ["quantize", str(tmp_path / "q"), "-o", str(tmp_path / "again"), "--scheme", scheme],
            tmp_path / "again",
            "already quantized",
            "dequantize it first",
        )


def test_refuses_an_unknown_scheme(tiny_model, tmp_path, capsys):
    _refused(
        capsys,
        ["quantize", str(tiny_model("llama")), "-o", str(tmp_path / "q"), "--scheme", "int3"],
        tmp_path / "q",
        "unknown quantization scheme 'int3'",
        "int8",
        "nf4",
    )


def test_refuses_a_group_size_that_does_not_divide_the_width(tiny_model, tmp_path, capsys):
    # hidden 64 and intermediate 96: 48 divides 96 but not 64
    _refused(
        capsys,
        ["quantize", str(tiny_model("llama")), "-o", str(tmp_path / "q"), "--group-size", "48"],
        tmp_path / "q",
        "width 64 is not a multiple of group size 48",
        "more",
    )


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--scheme", "nf4", "--group-size", "48"], ["nf4: group_size 48"]),
        (["--scheme", "nf4", "--weight-only"], ["nf4: option(s) weight_only do not apply"]),
        (["--double-quant"], ["int8: option(s) double_quant do not apply"]),
        (["--ignore", "lm_head,mpl"], ["'mpl' match no 2-D weight"]),
        (["--scheme", "nf4", "--compute-dtype", "int4"], ["compute_dtype 'int4'"]),
    ],
)
def test_refuses_bad_options(tiny_model, tmp_path, capsys, argv, needles):
    _refused(capsys, ["quantize", str(tiny_model("llama")), "-o", str(tmp_path / "q"), *argv], tmp_path / "q", *needles)


def test_refuses_a_model_without_linear_weights(tiny_model, tmp_path, capsys):
    _refused(
        capsys,
        ["quantize", str(tiny_model("gpt2")), "-o", str(tmp_path / "q")],
        tmp_path / "q",
        "no 2-D Linear weights",
        "Conv1D",
    )


def test_dequantize_refuses_a_float_checkpoint(tiny_model, tmp_path, capsys):
    _refused(
        capsys, ["dequantize", str(tiny_model("llama")), "-o", str(tmp_path / "d")], tmp_path / "d", "not quantized"
    )


def test_quantize_and_dequantize_json_reports(tiny_model, tmp_path, capsys):
    src = tiny_model("qwen2")
    assert main(["quantize", str(src), "-o", str(tmp_path / "q"), "--scheme", "nf4", "--double-quant", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = report["summary"]
    assert summary["quantized_tensors"] == 14 and summary["bytes_in"] > summary["bytes_out"]
    assert summary["worst_tensor"] == report["tensors"][0]["name"]
    assert report["details"]["ignored_modules"] == ["lm_head", "model.embed_tokens"]
    assert main(["dequantize", str(tmp_path / "q"), "-o", str(tmp_path / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["dequantized_tensors"] == 14
    assert main(["inspect", str(tmp_path / "q"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["details"]["quantization"]
    assert facts["scheme"] == "nf4 block 64 + double quant" and facts["bits"] == 4


def test_help_examples_parse():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("quantize", "dequantize"):
        epilog = sub.choices[name].epilog
        examples = [line.strip() for line in epilog.splitlines()[1:] if line.strip()]
        assert examples
        for example in examples:
            args = parser.parse_args(shlex.split(example)[1:])
            assert args.command == name
