"""The command line: bad input gets one clear line and exit 2 with nothing written; help is torch-free and its
examples parse; inspect/diff report what the files really hold."""

from __future__ import annotations

import json
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _loading import load_checked

import weightsmith as ws
from weightsmith.cli import build_parser, main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed while building models
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(capsys, out_dir: Path, *argv, match: str) -> None:
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("weightsmith: error: "), err
    assert match in lines[0], lines[0]
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if ".weightsmith-" in p.name]  # no temporary leftovers


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_path(capsys, tmp_path):
    assert_refused(
        capsys,
        tmp_path / "out",
        "convert",
        tmp_path / "nope",
        "-o",
        tmp_path / "out",
        match="no such file or directory",
    )


def test_empty_directory(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(
        capsys, tmp_path / "out", "convert", tmp_path / "empty", "-o", tmp_path / "out", match="empty directory"
    )


def test_truncated_safetensors(capsys, tiny_model, tmp_path):
    model = _copy_model(tiny_model("llama"), tmp_path / "m")
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert_refused(capsys, tmp_path / "out", "convert", model, "-o", tmp_path / "out", match="truncated")


def test_header_claims_more_than_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b'{"a": 1}')
    assert_refused(
        capsys, tmp_path / "out", "convert", bad, "-o", tmp_path / "out", match="header claims 1000000 bytes"
    )


def test_malformed_header(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((5).to_bytes(8, "little") + b"{nope")
    assert_refused(capsys, tmp_path / "out", "inspect", bad, match="malformed safetensors header")


def _sharded(tiny_model, tmp_path) -> Path:
    return _copy_model(tiny_model("llama", shard_size="100KB"), tmp_path / "m")


def test_index_names_missing_shard(capsys, tiny_model, tmp_path):
    model = _sharded(tiny_model, tmp_path)
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert_refused(capsys, tmp_path / "out", "convert", model, "-o", tmp_path / "out", match="which is missing")


def test_index_names_path_outside(capsys, tiny_model, tmp_path):
    model = _sharded(tiny_model, tmp_path)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../x.safetensors"
    (tmp_path / "x.safetensors").write_bytes(b"")
    index_path.write_text(json.dumps(index))
    assert_refused(
        capsys, tmp_path / "out", "convert", model, "-o", tmp_path / "out", match="outside the checkpoint directory"
    )


def test_same_tensor_in_two_shards(capsys, tmp_path):
    from safetensors.torch import save_file

    model = tmp_path / "m"
    model.mkdir()
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, model / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(2)}, model / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(capsys, tmp_path / "out", "convert", model, "-o", tmp_path / "out", match="appears in both")


class Payload:
    """An arbitrary object: loading it would run code of the file's choosing."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_bin_with_arbitrary_objects_is_refused(capsys, tmp_path):
    bad = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "evil": Payload()}, bad)
    assert_refused(capsys, tmp_path / "out", "convert", bad, "-o", tmp_path / "out", match="weights_only")
    assert "this must never run" not in capsys.readouterr().out


def test_bin_with_non_tensor_entries_is_refused(capsys, tmp_path):
    bad = tmp_path / "training.bin"
    torch.save({"w": torch.ones(2), "step": 7}, bad)
    assert_refused(capsys, tmp_path / "out", "convert", bad, "-o", tmp_path / "out", match="not tensors: step")


def test_plain_pickle_is_refused(capsys, tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    code, _, err = run_cli(capsys, "inspect", bad)
    assert code == 2 and err.count("\n") == 1 and str(bad) in err


def test_destination_exists_without_force(capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, "convert", tiny_model("bert"), "-o", out)
    assert code == 2 and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert run_cli(capsys, "convert", tiny_model("bert"), "-o", out, "--force")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_unwritable_destination(capsys, tiny_model, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "convert", tiny_model("bert"), "-o", tmp_path / "afile" / "out")
    assert code == 2 and "cannot write here" in err and err.count("\n") == 1
    assert (tmp_path / "afile").read_text() == "x"


def test_bad_shard_size(capsys, tiny_model, tmp_path):
    assert_refused(
        capsys,
        tmp_path / "out",
        "convert",
        tiny_model("bert"),
        "-o",
        tmp_path / "out",
        "--shard-size",
        "lots",
        match="size 'lots'",
    )


def test_inspect_reports_what_the_model_holds(capsys, tiny_model):
    import transformers as tf

    path = tiny_model("gpt2")
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    assert code == 0
    report = json.loads(out)
    model = load_checked(tf.AutoModelForCausalLM, path)
    stored = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    assert report["summary"]["parameters"] == sum(v.numel() for v in stored.values())
    assert report["summary"]["bytes"] == sum(v.numel() * v.element_size() for v in stored.values())
    assert report["summary"]["tied_weights"] == {"lm_head.weight": "transformer.wte.weight"}
    assert report["details"]["architecture"]["model_type"] == "gpt2"
    assert report["summary"]["dtypes"] == {"float32": len(stored)}


def test_inspect_stats_match_the_tensors(capsys, tmp_path):
    t = torch.tensor([[0.0, -3.0, float("nan")], [2.0, float("inf"), 0.0]])
    ws.save({"t": t, "u": torch.arange(6, dtype=torch.int32)}, tmp_path / "m")
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "m", "--stats", "--json")
    row = next(r for r in json.loads(out)["tensors"] if r["name"] == "t")
    finite = torch.tensor([0.0, -3.0, 2.0, 0.0])
    assert (row["nan"], row["inf"], row["min"], row["max"]) == (1, 1, -3.0, 2.0)
    assert row["zeros"] == pytest.approx(2 / 6)
    assert row["mean"] == pytest.approx(float(finite.mean())) and row["std"] == pytest.approx(float(finite.std()))


def test_inspect_adapter(capsys, tiny_model, tmp_path):
    import peft
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    peft.get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "adapter", "--json")
    adapter = json.loads(out)["details"]["adapter"]
    assert (adapter["peft_type"], adapter["r"], adapter["lora_alpha"]) == ("LORA", 4, 8)
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert adapter["variants"] == ["rslora"] and adapter["adapted_modules"] == 4  # 2 layers × q, v


def test_diff_finds_each_kind_of_difference(capsys, tmp_path):
    a = {"same": torch.randn(4, 4), "changed": torch.randn(8, 8), "shape": torch.zeros(3), "gone": torch.ones(1)}
    b = {"same": a["same"].clone(), "changed": a["changed"].clone(), "shape": torch.zeros(4), "new": torch.ones(1)}
    b["changed"][2, 3] += 0.5
    ws.save(a, tmp_path / "a")
    ws.save(b, tmp_path / "b")
    code, out, _ = run_cli(capsys, "diff", tmp_path / "a", tmp_path / "b", "--json")
    report = json.loads(out)
    s = report["summary"]
    assert (s["compared"], s["identical"], s["differ"]) == (2, 1, 1)
    assert (s["missing_in_b"], s["extra_in_b"], s["shape_mismatches"]) == (1, 1, 1)
    assert s["worst"] == "changed"
    assert s["max_abs"] == pytest.approx(0.5, abs=1e-6)
    row = report["tensors"][0]
    delta = torch.zeros(8, 8)
    delta[2, 3] = 0.5
    assert row["rel_fro"] == pytest.approx(0.5 / float(a["changed"].norm()), rel=1e-4)
    assert report["details"]["names_missing_in_b"] == ["gone"]
    code, text, _ = run_cli(capsys, "diff", tmp_path / "a", tmp_path / "b")
    assert text.splitlines()[0] == "diff"


def test_help_does_not_import_torch():
    code = (
        "import sys; from weightsmith.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _subcommand_parsers(parser):
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            yield name, sub
            if sub._subparsers is not None:
                yield from _subcommand_parsers(sub)


def test_every_help_example_parses():
    parser = build_parser()
    examples = 0
    for name, sub in _subcommand_parsers(parser):
        assert sub.epilog and "examples:" in sub.epilog, f"{name}: no examples in --help"
        for line in sub.epilog.splitlines():
            if line.strip().startswith("weightsmith "):
                args = parser.parse_args(shlex.split(line.strip())[1:])
                assert callable(args.handler)
                examples += 1
    assert examples >= 6


def test_console_script_exit_codes(tiny_model, tmp_path):
    exe = Path(sys.executable).parent / "weightsmith"
    ok = subprocess.run([exe, "inspect", tiny_model("bert")], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("inspect")
    bad = subprocess.run([exe, "inspect", tmp_path / "missing"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1


def test_public_names_survive_importing_every_module():
    """A submodule named like a verb would replace the verb on the package once imported (ws.convert, ws.evaluate)."""
    import importlib
    import pkgutil

    import weightsmith

    for module in pkgutil.walk_packages(weightsmith.__path__, "weightsmith."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    for name, (module, attr) in weightsmith._EXPORTS.items():
        expected = importlib.import_module(module)
        expected = getattr(expected, attr) if attr else expected
        assert getattr(weightsmith, name) is expected, name
