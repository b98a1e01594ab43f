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
    out = subprocess.run([sys.executable, "-m", "weightsmith.digests", str(path), str(tmp_path / "missing")],
                         capture_output=True, text=True, check=True).stdout
    assert out == f"{expected}  {path}\n"
