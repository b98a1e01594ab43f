"""The on-disk cache of derived facts: what it stores comes back only under its own key, and a broken or unwritable
cache is a miss, never an error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _architectures import build

from weightsmith import architecture, cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    architecture._facts.cache_clear()
    yield tmp_path / "cache"
    architecture._facts.cache_clear()


def test_value_comes_back_under_its_key_only(cache_dir):
    cache.store("things", "key one", {"a": [1, 2], "b": None})
    assert cache.load("things", "key one") == {"a": [1, 2], "b": None}
    assert cache.load("things", "key two") is None
    assert cache.load("other things", "key one") is None


def test_an_entry_under_another_key_is_a_miss(cache_dir):
    cache.store("things", "key one", 1)
    (entry,) = (cache_dir / "things").iterdir()
    entry.write_text(json.dumps({"key": "key two", "value": 2}))  # as a hash collision would leave it
    assert cache.load("things", "key one") is None


def test_a_truncated_entry_is_a_miss_and_is_replaced(cache_dir):
    cache.store("things", "key", [1, 2, 3])
    (entry,) = (cache_dir / "things").iterdir()
    entry.write_text(entry.read_text()[:10])
    assert cache.load("things", "key") is None
    cache.store("things", "key", [4])
    assert cache.load("things", "key") == [4]
    assert [p.name for p in (cache_dir / "things").iterdir()] == [entry.name]  # no temporary file left behind


def test_off_stores_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    cache.store("things", "key", 1)
    assert cache.load("things", "key") is None
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(blocker))
    cache.store("things", "key", 1)  # cannot make a folder inside a file
    assert cache.load("things", "key") is None


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "vit"])
def test_model_facts_read_back_equal_the_derived_ones(cache_dir, monkeypatch, arch):
    config = build(arch).config.to_dict()
    derived = architecture.model_facts(config)
    assert derived is not None
    architecture._facts.cache_clear()

    def no_transformers(config_json):
        raise AssertionError("derived again instead of read back")

    monkeypatch.setattr(architecture, "_derive_facts", no_transformers)
    assert architecture.model_facts(config) == derived


def test_model_facts_are_derived_again_for_another_transformers_version(cache_dir, monkeypatch):
    import importlib.metadata

    config = build("llama").config.to_dict()
    derived = architecture.model_facts(config)
    architecture._facts.cache_clear()
    calls = []
    real = architecture._derive_facts
    monkeypatch.setattr(architecture, "_derive_facts", lambda c: calls.append(c) or real(c))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1-other")
    assert architecture.model_facts(config) == derived
    assert len(calls) == 1


def test_a_second_process_reads_the_facts_without_importing_transformers(cache_dir):
    config = json.dumps(build("llama").config.to_dict())
    code = (
        "import json, sys\nfrom weightsmith.architecture import model_facts\n"
        f"facts = model_facts(json.loads({config!r}))\n"
        "print(json.dumps([facts.model_class, 'transformers' in sys.modules, 'torch' in sys.modules]))"
    )
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
        for _ in range(2)
    ]
    assert runs == [["LlamaModel", True, True], ["LlamaModel", False, False]]


# -- input digests by file identity --------------------------------------------------------------------------------


@pytest.fixture
def fresh_digests(cache_dir, monkeypatch):
    from weightsmith import digests

    monkeypatch.setattr(digests, "_DIGESTS", {})
    return digests


def test_a_digest_is_read_back_for_the_same_unchanged_file(fresh_digests, tmp_path, monkeypatch):
    import hashlib

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 5000)
    assert fresh_digests.file_sha256(f) == hashlib.sha256(b"x" * 5000).hexdigest()
    monkeypatch.setattr(fresh_digests, "_DIGESTS", {})  # a new process: only the on-disk cache remembers

    def no_hashing(path):
        raise AssertionError("hashed again")

    monkeypatch.setattr(fresh_digests, "_sha256", no_hashing)
    assert fresh_digests.file_sha256(f) == hashlib.sha256(b"x" * 5000).hexdigest()
    monkeypatch.setattr(fresh_digests.subprocess, "Popen", no_hashing)  # nor a helper started for it
    fresh_digests.prefetch([tmp_path])


def test_a_rewritten_file_is_hashed_anew(fresh_digests, tmp_path, monkeypatch):
    import hashlib
    import os

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 5000)
    before = fresh_digests.file_sha256(f)
    monkeypatch.setattr(fresh_digests, "_DIGESTS", {})
    f.write_bytes(b"b" * 5000)  # same size, new bytes
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert fresh_digests.file_sha256(f) == hashlib.sha256(b"b" * 5000).hexdigest() != before


def test_no_digest_is_kept_when_the_cache_is_off(tmp_path, monkeypatch):
    from weightsmith import digests

    monkeypatch.setenv("WEIGHTSMITH_CACHE", "off")
    monkeypatch.setattr(digests, "_DIGESTS", {})
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"c" * 100)
    calls = []
    real = digests._sha256
    monkeypatch.setattr(digests, "_sha256", lambda p: calls.append(p) or real(p))
    for _ in range(2):
        monkeypatch.setattr(digests, "_DIGESTS", {})
        digests.file_sha256(f)
    assert len(calls) == 2
