"""Input digests for provenance: hashed in a helper process started before torch, answers equal hashlib's."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from weightsmith import digests


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(digests, "_DIGESTS", {})


def _weight_file(path, size=3 * 2**20 + 17, seed=0):
    data = bytes((i * 131 + seed) % 251 for i in range(size))
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_file_sha256_is_sha256_of_the_bytes(tmp_path):
    path, expected = _weight_file(tmp_path / "model.safetensors")
    assert digests.file_sha256(path) == expected


def test_prefetched_digests_come_from_the_helper_process(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    model, model_sha = _weight_file(tmp_path / "model" / "model.safetensors")
    adapter, adapter_sha = _weight_file(tmp_path / "adapter.bin", seed=7)
    (tmp_path / "model" / "config.json").write_text("{}")  # not a weight file: not hashed
    digests.prefetch([tmp_path / "model", adapter, tmp_path / "missing", "not a path@0.5"])

    def no_local_hashing(path):
        raise AssertionError(f"{path} was hashed in-process")

    monkeypatch.setattr(digests, "_sha256", no_local_hashing)
    assert digests.file_sha256(model) == model_sha
    assert digests.file_sha256(adapter) == adapter_sha


def test_a_file_changed_after_prefetch_is_hashed_again(tmp_path):
    path, _ = _weight_file(tmp_path / "model.safetensors")
    digests.prefetch([path])
    _, expected = _weight_file(path, size=2**20, seed=3)
    os.utime(path, ns=(1, 1))  # a different size and mtime: a different file as far as the cache knows
    assert digests.file_sha256(path) == expected


def test_an_unreadable_prefetch_falls_back_to_hashing_here(tmp_path, monkeypatch):
    path, expected = _weight_file(tmp_path / "model.safetensors")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))  # the helper cannot start
    digests.prefetch([path])
    assert digests.file_sha256(path) == expected


def test_helper_prints_sha256sum_lines(tmp_path):
    path, expected = _weight_file(tmp_path / "model.safetensors")
    out = subprocess.run(
        [sys.executable, "-m", "weightsmith.digests", str(path), str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == f"{expected}  {path}\n"


def test_commands_name_the_checkpoints_they_read(tmp_path):
    """What the CLI hashes ahead: a merge config's models and base, a recipe's input, a fold's base and adapters
    (weights stripped), never the output."""
    from weightsmith.cli import build_parser

    def inputs(*argv):
        args = build_parser().parse_args([str(a) for a in argv])
        return list(args.inputs(args))

    config = tmp_path / "ties.yaml"
    config.write_text("merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n  - model: ./b+./lora\n")
    assert inputs("merge", config, "-o", tmp_path / "out") == ["./base", "./a", "./b", "./lora"]
    assert inputs("merge", "--method", "linear", "--model", "x@0.5", "--model", "y", "-o", "o") == ["x", "y"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("input: ./model\noutput: ./shipped\nsteps:\n  - quantize: {scheme: int8}\n")
    assert inputs("run", recipe) == ["./model"]
    assert inputs("run", recipe, "--dry-run") == []
    assert inputs("run", tmp_path / "missing.yaml") == []


def test_each_writing_command_hashes_what_it_reads_and_nothing_else(monkeypatch):
    from weightsmith import cli

    seen = []
    monkeypatch.setattr(digests, "prefetch", lambda paths: seen.extend(paths))
    parser = cli.build_parser()
    for argv, expected in (
        (["lora", "merge", "base", "a1@0.5", "a2", "-o", "out"], ["base", "a1", "a2"]),
        (["lora", "unmerge", "merged", "a@0.7", "-o", "out"], ["merged", "a"]),
        (["quantize", "src", "-o", "out", "--scheme", "int8"], ["src"]),
        (["distill", "--teacher", "t", "--data", "d.txt", "-o", "out"], ["t"]),
        (["export", "onnx", "src", "-o", "m.onnx", "--task", "feature-extraction"], ["src"]),
    ):
        seen.clear()
        cli._start_input_digests(parser.parse_args(argv))
        assert seen == expected, argv
    assert not callable(getattr(parser.parse_args(["inspect", "x"]), "inputs", None))  # reads only: no hashing
