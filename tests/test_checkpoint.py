"""Reading and writing checkpoints: bit-exact round trips that transformers loads, sharding, provenance, atomicity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from _loading import load_checked

import weightsmith as ws
from weightsmith.checkpoint import CheckpointWriter, provenance_step
from weightsmith.errors import WeightsmithError

KINDS = ["llama", "gpt2", "bert", "qwen2", "mistral"]


def _outputs(path: Path, kind: str) -> torch.Tensor:
    cls = tf.AutoModel if kind == "bert" else tf.AutoModelForCausalLM
    model = cls.from_pretrained(path).eval()
    ids = torch.arange(12).reshape(2, 6) % 100 + 3
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state if kind == "bert" else out.logits


def _assert_same_tensors(a: Path, b: Path) -> None:
    ca, cb = ws.open(a), ws.open(b)
    assert set(ca) == set(cb)
    for name in ca:
        x, y = ca[name], cb[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)) if x.is_floating_point() else torch.equal(x, y)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copy_through_is_bit_exact_and_loads(tiny_model, tmp_path, kind, dtype):
    src = tiny_model(kind, dtype=dtype)
    ws.convert(src, tmp_path / "out")
    _assert_same_tensors(src, tmp_path / "out")
    torch.testing.assert_close(_outputs(tmp_path / "out", kind), _outputs(src, kind), rtol=0, atol=0)


def test_reads_what_transformers_writes_sharded(tiny_model, tmp_path):
    src = tiny_model("llama", shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()
    model = tf.AutoModelForCausalLM.from_pretrained(src)
    ckpt = ws.open(src)
    state = model.state_dict()
    assert set(ckpt) == set(state)
    for name in ckpt:
        assert torch.equal(ckpt[name], state[name])
        assert ckpt.info(name).shape == tuple(state[name].shape)


def test_writes_shards_at_the_requested_size(tiny_model, tmp_path):
    src = tiny_model("llama")
    report = ws.convert(src, tmp_path / "out", shard_size="60KB")
    files = sorted((tmp_path / "out").glob("model-*.safetensors"))
    n = len(files)
    assert n == report.summary["shards"] > 1
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    ckpt = ws.open(src)
    assert index["metadata"]["total_size"] == sum(ckpt.info(k).nbytes for k in ckpt)
    assert set(index["weight_map"]) == set(ckpt)
    for f in files:  # no shard holds more than the limit unless a single tensor is larger
        infos = ws.open(f).infos()
        assert sum(i.nbytes for i in infos) <= 60_000 or len(infos) == 1
    _assert_same_tensors(src, tmp_path / "out")
    torch.testing.assert_close(_outputs(tmp_path / "out", "llama"), _outputs(src, "llama"), rtol=0, atol=0)


def test_dtype_cast_at_write_time(tiny_model, tmp_path):
    src = tiny_model("qwen2")
    ws.convert(src, tmp_path / "out", dtype="bf16")
    out = ws.open(tmp_path / "out")
    ckpt = ws.open(src)
    for name in out:
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], ckpt[name].to(torch.bfloat16))
    assert out.config.get("dtype", out.config.get("torch_dtype")) == "bfloat16"
    model = load_checked(tf.AutoModelForCausalLM, tmp_path / "out", dtype="auto")
    assert model.dtype == torch.bfloat16


def test_reads_pytorch_bin_single_and_sharded(tiny_model, tmp_path):
    src = tiny_model("gpt2")
    state = {k: v.clone() for k, v in ws.open(src).items()}
    single = tmp_path / "single"
    single.mkdir()
    torch.save(state, single / "pytorch_model.bin")
    (single / "config.json").write_text((src / "config.json").read_text())
    ws.convert(single, tmp_path / "from_single")
    _assert_same_tensors(src, tmp_path / "from_single")

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, keys in halves.items():
        torch.save({k: state[k] for k in keys}, sharded / fname)
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text((src / "config.json").read_text())
    ckpt = ws.open(sharded)
    assert ckpt.format == "pytorch" and len(ckpt.weight_files) == 2
    ws.convert(sharded, tmp_path / "from_sharded")
    _assert_same_tensors(src, tmp_path / "from_sharded")
    torch.testing.assert_close(_outputs(tmp_path / "from_sharded", "gpt2"), _outputs(src, "gpt2"), rtol=0, atol=0)


def test_single_files_and_tied_weights(tiny_model):
    gpt2 = ws.open(tiny_model("gpt2"))
    assert "lm_head.weight" not in gpt2
    assert gpt2.tied_weights == {"lm_head.weight": "transformer.wte.weight"}
    assert ws.open(tiny_model("llama")).tied_weights == {}
    assert ws.open(tiny_model("llama_tied")).tied_weights == {"lm_head.weight": "model.embed_tokens.weight"}
    single = ws.open(tiny_model("bert") / "model.safetensors")
    assert single.config is None and len(single) == len(ws.open(tiny_model("bert")))


def test_provenance_names_inputs_with_their_digest(tiny_model, tmp_path):
    src = tiny_model("llama")
    ws.convert(src, tmp_path / "out", dtype="float16")
    meta = ws.open(tmp_path / "out").metadata
    assert meta["format"] == "pt"  # transformers refuses safetensors files without it
    record = json.loads(meta["weightsmith"])
    assert record["version"] == ws.__version__
    (step,) = record["steps"]
    assert step["operation"] == "convert" and step["parameters"]["dtype"] == "torch.float16"
    expected = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert step["inputs"] == [{"path": str(src), "sha256": expected}]


def test_carried_files_and_config(minilm_path, tmp_path):
    ws.convert(minilm_path, tmp_path / "out")
    for name in ("tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (minilm_path / name).read_bytes()
    assert json.loads((tmp_path / "out/config.json").read_text()) == json.loads(
        (minilm_path / "config.json").read_text()
    )


def test_real_minilm_round_trip_gives_same_embeddings(minilm_path, tmp_path):
    from conftest import embed

    ws.convert(minilm_path, tmp_path / "out", shard_size="30MB")
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    torch.testing.assert_close(embed(tmp_path / "out"), embed(minilm_path), rtol=0, atol=0)


class _Exploding(dict):
    """A tensor dict whose third read fails, as a crash or Ctrl-C half-way through a write would."""

    def __init__(self, tensors, exc):
        super().__init__(tensors)
        self.exc, self.reads = exc, 0

    def __getitem__(self, key):
        self.reads += 1
        if self.reads == 3:
            raise self.exc
        return super().__getitem__(key)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(tmp_path, exc):
    tensors = _Exploding({f"t{i}": torch.randn(64, 64) for i in range(5)}, exc)
    with pytest.raises(type(exc)):
        ws.save(tensors, tmp_path / "out", shard_size="20KB")
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temporary directory


def test_force_replaces_and_refusal_keeps_old(tmp_path):
    out = tmp_path / "out"
    ws.save({"a": torch.ones(3)}, out)
    with pytest.raises(WeightsmithError, match="`force`"):
        ws.save({"b": torch.zeros(3)}, out)
    assert set(ws.open(out)) == {"a"}
    ws.save({"b": torch.zeros(3)}, out, force=True)
    assert set(ws.open(out)) == {"b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_writer_refuses_duplicate_names(tmp_path):
    with pytest.raises(WeightsmithError, match="written twice"):
        with CheckpointWriter(tmp_path / "out", steps=[provenance_step("t", {}, [])]) as w:
            w.write("x", torch.ones(2))
            w.write("x", torch.ones(2))
    assert not (tmp_path / "out").exists()


def test_large_shard_header_is_filled_in_place(tmp_path):
    # Shards above the in-place threshold keep the reserved header block padded with spaces: still valid
    # safetensors for the reference reader.
    from safetensors.torch import load_file

    big = {"w": torch.randn(4096, 4200), "b": torch.arange(10, dtype=torch.int64)}
    ws.save(big, tmp_path / "out")
    loaded = load_file(tmp_path / "out/model.safetensors")
    assert torch.equal(loaded["w"], big["w"]) and torch.equal(loaded["b"], big["b"])


def test_all_dtypes_round_trip(tmp_path):
    from safetensors.torch import load_file

    tensors = {
        str(dt): (torch.randn(3, 5) * 10).to(dt)
        for dt in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.int8,
            torch.uint8,
            torch.int32,
            torch.int64,
            torch.bool,
            torch.float8_e4m3fn,
        )
    }
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    ws.save(tensors, tmp_path / "out")
    ours, reference = ws.open(tmp_path / "out"), load_file(tmp_path / "out/model.safetensors")
    for name, t in tensors.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape
        raw = t.reshape(-1).view(torch.uint8)
        assert torch.equal(ours[name].reshape(-1).view(torch.uint8), raw)
        assert torch.equal(reference[name].reshape(-1).view(torch.uint8), raw)


def _by_rows(tensor: torch.Tensor, calls: list, unit: int = 1, fail_at: int | None = None):
    """``tensor`` as a ``Rows`` item whose fill copies the asked rows and records each (start, stop)."""
    from weightsmith.stream import Rows

    def fill(out, start, stop):
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("boom")
        calls.append((start, stop))
        out.copy_(tensor.reshape(tensor.shape[0], -1)[start:stop])

    return Rows(tuple(tensor.shape), tensor.dtype, fill, unit)


def test_tensors_written_by_rows_equal_whole_writes(tmp_path, monkeypatch):
    """A tensor filled a block of rows at a time into the writer's few buffers gives the same files, byte for byte
    (manifest digests included: its sha256 is taken piece by piece), as the tensor written whole; blocks cover the
    rows in order, in multiples of the producer's unit, about PIECE_BYTES each."""
    from weightsmith.checkpoint import writer

    monkeypatch.setattr(writer, "PIECE_BYTES", 256)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "fp32": (torch.randn(37, 5, generator=g), 3),  # 20-byte rows: 12 a piece, a short last block
        "bf16-conv": (torch.randn(9, 4, 3, 3, generator=g).bfloat16(), 1),  # one 72-byte row × 3 a piece
        "wide": (torch.randn(4, 100, generator=g), 2),  # a row (400 bytes) beyond a piece: the unit wins
        "int": (torch.arange(60, dtype=torch.int64).reshape(6, 10), 1),
        "vector": (torch.randn(70, generator=g), 8),
        "no-rows": (torch.zeros(0, 4), 1),
        "no-columns": (torch.zeros(5, 0), 1),
    }
    steps = [provenance_step("t", {}, [])]
    with CheckpointWriter(tmp_path / "whole", steps=steps, shard_size="1KB") as w:
        for name, (t, _) in tensors.items():
            w.write(name, t)
    blocks = {}
    with CheckpointWriter(tmp_path / "rows", steps=steps, shard_size="1KB") as w:
        for name, (t, unit) in tensors.items():
            w.write_rows(name, _by_rows(t, blocks.setdefault(name, []), unit))
    whole, rows = sorted((tmp_path / "whole").iterdir()), sorted((tmp_path / "rows").iterdir())
    assert [p.name for p in whole] == [p.name for p in rows] and len(whole) > 3  # several shards
    for a, b in zip(whole, rows, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert ws.verify(tmp_path / "rows").summary["tensors"] == len(tensors)
    for name, (t, unit) in tensors.items():
        count = t.shape[0]
        spans = blocks[name]
        assert [s for s, _ in spans] == [0, *(e for _, e in spans)][: len(spans)]  # in order, no gap
        assert (spans[-1][1] if spans else 0) == count
        assert all((e - s) % unit == 0 for s, e in spans[:-1])
        row_bytes = t[0].numel() * t.element_size() if count else 0
        assert all((e - s) * row_bytes <= max(256, unit * row_bytes) for s, e in spans), name


def test_rows_failing_midway_leave_nothing(tmp_path):
    t = torch.randn(4096, 300)
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out", steps=[provenance_step("t", {}, [])]) as w:
            w.write("a", torch.ones(3))
            w.write_rows("b", _by_rows(t, [], fail_at=1))  # the second of two pieces
    assert list(tmp_path.iterdir()) == []


def test_rows_take_the_writers_dtype(tmp_path):
    t = torch.randn(300, 70)
    with CheckpointWriter(tmp_path / "out", steps=[provenance_step("t", {}, [])], dtype=torch.bfloat16) as w:
        w.write_rows("t", _by_rows(t, []))
    got = ws.open(tmp_path / "out")["t"]
    assert got.dtype == torch.bfloat16 and torch.equal(got, t.bfloat16())
