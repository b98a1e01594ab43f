"""``verify``: an output is checked against the manifest its writer recorded; any changed byte is found and the
first corrupted tensor (or the header, or the file) is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightsmith as ws
from weightsmith.checkpoint.files import MANIFEST, SafetensorsFile
from weightsmith.cli import main
from weightsmith.errors import CheckpointError


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_model) -> Path:
    """A sharded weightsmith output (tokenizer-less llama, 3+ shards, an index and config.json)."""
    out = tmp_path_factory.mktemp("verify") / "out"
    ws.convert(tiny_model("llama"), out, shard_size="100KB")
    return out


def test_an_untouched_output_verifies(written):
    report = ws.verify(written)
    manifest = json.loads((written / MANIFEST).read_text())
    shards = sorted(written.glob("*.safetensors"))
    assert len(shards) >= 3
    assert set(manifest["files"]) == {p.name for p in written.iterdir() if p.name != MANIFEST}
    assert (
        report.summary["tensors"]
        == len(ws.open(written))
        == sum(len(manifest["files"][s.name]["tensors"]) for s in shards)
    )


def test_the_manifest_covers_every_byte_of_each_shard(written):
    """Header plus tensors, back to back: a shard's recorded pieces add up to its size."""
    manifest = json.loads((written / MANIFEST).read_text())["files"]
    for shard in written.glob("*.safetensors"):
        f = SafetensorsFile(shard, shard.name)
        spans = sorted(f.location(n)[1:] for n in f.names())
        assert spans[0][0] == f.data_start
        assert all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert spans[-1][0] + spans[-1][1] == manifest[shard.name]["size"] == shard.stat().st_size


def _flip(path: Path, position: int) -> int:
    data = bytearray(path.read_bytes())
    old = data[position]
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    return old


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_flipped_byte_anywhere_in_a_shard_is_found_and_named(written, data):
    shards = sorted(written.glob("*.safetensors"))
    shard = data.draw(st.sampled_from(shards))
    position = data.draw(st.integers(0, shard.stat().st_size - 1))
    f = SafetensorsFile(shard, shard.name)
    holder = next((n for n in f.names() if f.location(n)[1] <= position < sum(f.location(n)[1:])), None)
    original = shard.read_bytes()
    _flip(shard, position)
    try:
        with pytest.raises(CheckpointError) as caught:
            ws.verify(written)
    finally:
        shard.write_bytes(original)
    message = str(caught.value)
    assert str(shard) in message and "\n" not in message
    if holder is None:
        assert "header" in message
    else:
        assert f"tensor {holder!r} is corrupted" in message


def test_missing_truncated_and_changed_files_are_named(written, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(written, out)
    shard = sorted(out.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: {len(data) - 1} bytes, but {len(data)} were written"):
        ws.verify(out)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: missing"):
        ws.verify(out)
    shard.write_bytes(data)
    index = out / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(text.replace("00001", "00002", 1))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: .*differ"):
        ws.verify(out)
    index.write_text(text)
    config = out / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 64', '"hidden_size": 65'))
    with pytest.raises(CheckpointError, match="config.json: .*differ"):
        ws.verify(out)


def test_a_checkpoint_without_manifest_is_refused(tiny_model):
    with pytest.raises(CheckpointError, match=f"no {MANIFEST}"):
        ws.verify(tiny_model("llama"))


def test_the_manifest_is_not_carried_into_the_next_output(written, tmp_path):
    ws.convert(written, tmp_path / "again", dtype="bfloat16")
    manifest = json.loads((tmp_path / "again" / MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["size"] == (tmp_path / "again" / "model.safetensors").stat().st_size
    ws.verify(tmp_path / "again")


def test_cli_verify(capsys, written, tmp_path):
    assert main(["verify", str(written)]) == 0
    assert "every file, header and tensor matches" in capsys.readouterr().out
    out = tmp_path / "out"
    shutil.copytree(written, out)
    shard = sorted(out.glob("*.safetensors"))[0]
    f = SafetensorsFile(shard, shard.name)
    name = f.names()[-1]
    _flip(shard, f.location(name)[1])
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tensor {name!r} is corrupted" in err
