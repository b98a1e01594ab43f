"""Property-based and mutation fuzzing of every parser an outside file reaches, through the real command line.

Targets: safetensors headers and bytes, ``model.safetensors.index.json`` and ``pytorch_model.bin.index.json``,
``.bin`` pickles (code via ``__reduce__``, unknown globals, random opcodes, zips and storages that claim huge sizes),
``adapter_config.json``, ``config.json``, merge YAML and recipe YAML (alias bombs, non-mappings, wrong types, unknown
keys). Each input must be accepted (and then its output verifies) or refused with one line and exit 2; a traceback,
a partial output, a hang or code executed fails (tests/fuzzing.py). The bound on examples comes from the Hypothesis
profile (tests/conftest.py) times each target's weight (``budget``): the parsers that answer in milliseconds get
more inputs than those that build a model; about 3,200 in ``make test``, about 12,000 in ``make fuzz``. Every
input kept in ``tests/fuzz_corpus/`` is replayed first.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from fuzzing import MARKER, budget, corpus_cases, exercise
from hypothesis import given
from hypothesis import strategies as st

import weightsmith as ws
from weightsmith.checkpoint.files import ST_DTYPES

# -- shared values ------------------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=8
)
tensor_names = st.sampled_from(["a", "b", "w.weight", "__metadata__", "", "\x00", "é", "\ud800", "a" * 300]) | st.text(
    max_size=20
)


def _dump_json(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _fresh(work: Path, name: str) -> Path:
    path = work / name
    shutil.rmtree(path, ignore_errors=True)
    if path.is_file() or path.is_symlink():
        path.unlink()
    return path


# -- safetensors --------------------------------------------------------------------------------------------------

_ITEMSIZE = {code: dtype.itemsize for code, dtype in ST_DTYPES.items()}
_BAD_DTYPES = ["F4", "f32", "", "I128", "C64", "F8_E8M0", None, 3, ["F32"], {"F32": 1}]
_BAD_SHAPES = [[-1], [-2, -2], [2**40, 2**40], [1.5], ["3"], "12", [True, 2], None, [[2]], 5, [2**64]]
_BAD_OFFSETS = [[5, 1], [-4, 0], [0], [0, 1, 2], [0.0, 4.0], ["0", "4"], None, [0, 2**64], [True, False]]


@st.composite
def safetensors_bytes(draw) -> bytes:
    header: dict = {}
    offset = 0
    for name in draw(st.lists(tensor_names, max_size=4, unique=True)):
        if name == "__metadata__":
            continue
        dtype = draw(st.sampled_from(sorted(ST_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = bytearray(draw(st.binary(min_size=offset, max_size=offset)))
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.sampled_from([{"format": "pt"}, {"weightsmith": "{"}, {"weightsmith": '{"steps": 5}'}])
            | st.dictionaries(st.text(max_size=5), json_values, max_size=3)
            | json_values
        )
    names = [n for n in header if n != "__metadata__"]
    for _ in range(draw(st.integers(0, 3))):  # perturb the entries
        if not names:
            break
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "extra", "overlap", "swap", "shift"]))
        entry = header[name]
        if not isinstance(entry, dict):
            continue
        if kind == "dtype":
            entry["dtype"] = draw(st.sampled_from(_BAD_DTYPES) | st.sampled_from(sorted(ST_DTYPES)))
        elif kind == "shape":
            entry["shape"] = draw(st.sampled_from(_BAD_SHAPES) | st.lists(st.integers(-(2**66), 2**66), max_size=4))
        elif kind == "offsets":
            entry["data_offsets"] = draw(st.sampled_from(_BAD_OFFSETS) | st.lists(st.integers(-5, 2**66), max_size=3))
        elif kind == "entry":
            header[name] = draw(json_values)
        elif kind == "extra":
            entry[draw(st.text(max_size=6))] = draw(json_values)
        elif kind == "overlap" and len(names) > 1:
            other = header[draw(st.sampled_from(names))]
            if isinstance(other, dict):
                entry["data_offsets"] = other.get("data_offsets")
        elif kind == "swap" and len(names) > 1:
            other = header[draw(st.sampled_from(names))]
            if isinstance(other, dict):
                entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
        elif kind == "shift" and isinstance(entry.get("data_offsets"), list):
            delta = draw(st.integers(-3, 3))
            entry["data_offsets"] = [x + delta if isinstance(x, int) else x for x in entry["data_offsets"]]
    raw = _dump_json(header)
    if names and draw(st.booleans()):  # a duplicate name: JSON's last-one-wins would hide the first tensor
        first = json.dumps(names[0])
        raw = raw.replace(b"{", b"{" + first.encode() + b": " + _dump_json(header[names[0]]) + b", ", 1)
    if draw(st.booleans()):  # bytes that are not UTF-8
        pos = draw(st.integers(0, len(raw)))
        raw = raw[:pos] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + raw[pos:]
    if draw(st.booleans()):  # pad the header with spaces, as writers do for alignment
        raw += b" " * draw(st.integers(0, 8))
    length = len(raw) + draw(st.sampled_from([0, 0, 0, -1, 1, 8, 2**40, -len(raw)]))
    trailing = draw(st.binary(max_size=16)) if draw(st.booleans()) else b""
    return struct.pack("<Q", max(length, 0) % 2**64) + raw + bytes(data) + trailing


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """Byte-level mutations of a valid file: overwritten bytes, a truncation, an insertion."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


def _valid_safetensors() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
        "c": {"dtype": "I64", "shape": [1], "data_offsets": [22, 30]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(range(30))


def run_safetensors(work: Path, data: bytes) -> str:
    src = _fresh(work, "in.safetensors")
    src.write_bytes(data)
    out = _fresh(work, "out")
    outcome = exercise("safetensors", data, ["convert", src, "-o", out], out)
    if outcome == "accepted":
        exercise("safetensors", data, ["inspect", src, "--stats", "--tensors"])
    return outcome


@budget(4)
@given(data=safetensors_bytes())
def test_fuzz_safetensors_headers(work, data):
    run_safetensors(work, data)


@budget(8)
@given(data=mutated(_valid_safetensors()))
def test_fuzz_safetensors_mutations(work, data):
    run_safetensors(work, data)


# -- sharded indexes ----------------------------------------------------------------------------------------------

_REL_PATHS = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "../outside.safetensors",
    "/etc/passwd",
    "escape.safetensors",  # a symlink out of the folder
    "sub/../model-00001-of-00002.safetensors",
    "missing.safetensors",
    "",
    "sub",
    "config.json",
    "model-00001-of-00002.safetensors\x00",
    "./model-00002-of-00002.safetensors",
]


@pytest.fixture(scope="module")
def index_folder(work) -> Path:
    """Two valid shards (a, b | c), a symlink to a valid file outside, a sub-folder; the index is fuzzed."""
    folder = work / "indexed"
    ws.save({"a": torch.ones(2), "b": torch.zeros(3), "c": torch.arange(4.0)}, work / "tmp-src", shard_size=16)
    shards = sorted((work / "tmp-src").glob("*.safetensors"))
    folder.mkdir()
    (folder / "sub").mkdir()
    ws.save({"a": torch.ones(2)}, work / "outside-src")
    shutil.copy(work / "outside-src" / "model.safetensors", work / "outside.safetensors")
    (folder / "escape.safetensors").symlink_to(work / "outside.safetensors")
    for i, shard in enumerate(shards[:2]):
        shutil.copy(shard, folder / f"model-0000{i + 1}-of-00002.safetensors")
    torch.save({"a": torch.ones(2), "b": torch.zeros(3)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"c": torch.arange(4.0)}, folder / "pytorch_model-00002-of-00002.bin")
    return folder


_BIN_PATHS = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "../outside.bin", "x.bin"]


@st.composite
def index_bytes(draw, kind: str) -> bytes:
    paths = _REL_PATHS if kind == "safetensors" else _BIN_PATHS + _REL_PATHS[2:]
    weight_map = draw(
        st.dictionaries(
            st.sampled_from(["a", "b", "c", "d"]) | st.text(max_size=4),
            st.sampled_from(paths) | json_values,
            max_size=5,
        )
    )
    index = {"metadata": draw(st.sampled_from([{"total_size": 36}, {}]) | json_values), "weight_map": weight_map}
    if draw(st.integers(0, 9)) == 0:
        index = draw(st.sampled_from([[], "x", 5, {"weight_map": []}, {"weight_map": "a"}]) | json_values)
    raw = _dump_json(index)
    if isinstance(index, dict) and weight_map and draw(st.booleans()):  # one tensor listed for two shards
        key = json.dumps(next(iter(weight_map)))
        raw = raw.replace(b'"weight_map": {', b'"weight_map": {' + key.encode() + b': "' + paths[1].encode() + b'", ')
    return raw


def run_index(index_folder: Path, work: Path, kind: str, data: bytes) -> str:
    src = _fresh(work, f"index-{kind}")
    shutil.copytree(index_folder, src, symlinks=True)
    name = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    if kind == "bin":  # only the .bin shards: otherwise the safetensors index would not be the one read
        for p in src.glob("model-*.safetensors"):
            p.unlink()
    (src / name).write_bytes(data)
    out = _fresh(work, "out")
    return exercise(f"index_{kind}", data, ["convert", src, "-o", out], out)


@budget(2)
@given(data=index_bytes("safetensors"))
def test_fuzz_safetensors_index(index_folder, work, data):
    run_index(index_folder, work, "safetensors", data)


@budget(2)
@given(data=index_bytes("bin"))
def test_fuzz_bin_index(index_folder, work, data):
    run_index(index_folder, work, "bin", data)


# -- .bin pickles -------------------------------------------------------------------------------------------------


def _payloads() -> list:
    """Objects whose unpickling would run code that creates MARKER."""
    import builtins
    import subprocess

    marker = str(MARKER)

    class Reduce:
        def __init__(self, fn, args):
            self.fn, self.args = fn, args

        def __reduce__(self):
            return self.fn, self.args

    return [
        Reduce(os.system, (f"touch {marker}",)),
        Reduce(builtins.exec, (f"open({marker!r}, 'w').close()",)),
        Reduce(builtins.eval, (f"open({marker!r}, 'w')",)),
        Reduce(builtins.open, (marker, "w")),
        Reduce(subprocess.call, (["touch", marker],)),
        Reduce(Path.touch, (Path(marker),)),
        Reduce(shutil.copy, ("/etc/hostname", marker)),
    ]


_GLOBALS = [
    b"os\nsystem",
    b"posix\nsystem",
    b"builtins\nexec",
    b"builtins\neval",
    b"builtins\ngetattr",
    b"builtins\nopen",
    b"subprocess\ncall",
    b"torch._utils\n_rebuild_tensor_v2",
    b"torch\nFloatStorage",
    b"collections\nOrderedDict",
    b"torch\nsave",
    b"copyreg\n_reconstructor",
    b"__main__\nx",
    b"nosuchmodule\nname",
]


@st.composite
def opcode_pickles(draw) -> bytes:
    """Random pickle programs over opcodes that build, call and look up objects."""
    ops = [b"\x80\x02"]
    for _ in range(draw(st.integers(1, 12))):
        op = draw(
            st.sampled_from(
                [
                    "global",
                    "mark",
                    "tuple",
                    "reduce",
                    "dict",
                    "list",
                    "str",
                    "int",
                    "setitem",
                    "build",
                    "newobj",
                    "memo",
                    "get",
                    "persid",
                    "ext",
                    "inst",
                    "stack_global",
                ]
            )
        )
        if op == "global":
            ops.append(b"c" + draw(st.sampled_from(_GLOBALS)) + b"\n")
        elif op == "inst":
            ops.append(b"i" + draw(st.sampled_from(_GLOBALS)) + b"\n")
        elif op == "str":
            s = draw(st.sampled_from([f"touch {MARKER}", "w", str(MARKER), "a"])).encode()
            ops.append(b"X" + struct.pack("<I", len(s)) + s)
        elif op == "int":
            ops.append(b"J" + struct.pack("<i", draw(st.integers(-(2**31), 2**31 - 1))))
        elif op == "get":
            ops.append(b"h" + bytes([draw(st.integers(0, 3))]))
        elif op == "ext":
            ops.append(b"\x82" + bytes([draw(st.integers(0, 255))]))
        else:
            codes = {
                "mark": b"(",
                "tuple": b"t",
                "reduce": b"R",
                "dict": b"}",
                "list": b"]",
                "setitem": b"s",
                "build": b"b",
                "newobj": b"\x81",
                "memo": b"\x94",
                "persid": b"Q",
                "stack_global": b"\x93",
            }
            ops.append(codes[op])
    return b"".join(ops) + b"."


class _PickleWith:
    """A pickle module for torch.save whose Pickler hands torch other bytes for data.pkl (a well-formed zip)."""

    def __init__(self, transform):
        self.transform = transform
        outer = self

        class Pickler(pickle.Pickler):
            def __init__(self, file, protocol=None):
                self._target = file
                self._buffer = io.BytesIO()
                super().__init__(self._buffer, protocol)

            def dump(self, obj):
                super().dump(obj)
                self._target.write(outer.transform(self._buffer.getvalue()))

        self.Pickler = Pickler
        self.__name__ = "pickle"

    def __getattr__(self, name):
        return getattr(pickle, name)


def _torch_zip(state, transform=lambda b: b) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf, pickle_module=_PickleWith(transform))
    return buf.getvalue()


_VALID_STATE = {"a": torch.ones(2, 2), "b": torch.arange(3, dtype=torch.int64)}


def _huge_zip_sizes(data: bytes, size: int) -> bytes:
    """A torch zip whose central directory claims a huge size for every record."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos != -1:
        out[pos + 20 : pos + 28] = struct.pack("<II", size, size)  # compressed and uncompressed size
        pos = out.find(b"PK\x01\x02", pos + 4)
    return bytes(out)


@st.composite
def bin_bytes(draw) -> bytes:
    kind = draw(
        st.sampled_from(
            [
                "payload",
                "payload_raw",
                "opcodes",
                "opcodes_raw",
                "mutate_pkl",
                "mutate_file",
                "zip_sizes",
                "huge_storage",
                "odd_values",
            ]
        )
    )
    if kind == "payload":  # code inside an otherwise normal state dict, in torch's zip format
        return _torch_zip({"w": torch.ones(2), "x": draw(st.sampled_from(_payloads()))})
    if kind == "payload_raw":  # a legacy (non-zip) pickle file
        return pickle.dumps(draw(st.sampled_from(_payloads())), protocol=draw(st.integers(0, 5)))
    if kind == "opcodes":
        program = draw(opcode_pickles())
        return _torch_zip(_VALID_STATE, lambda _: program)
    if kind == "opcodes_raw":
        return draw(opcode_pickles())
    if kind == "mutate_pkl":
        flips = draw(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=3))

        def flip(b: bytes) -> bytes:
            out = bytearray(b)
            for pos, value in flips:
                out[pos % len(out)] = value
            return bytes(out)

        return _torch_zip(_VALID_STATE, flip)
    if kind == "mutate_file":
        return draw(mutated(_torch_zip(_VALID_STATE)))
    if kind == "zip_sizes":
        return _huge_zip_sizes(_torch_zip(_VALID_STATE), draw(st.sampled_from([2**32 - 1, 2**31, 10**9])))
    if kind == "huge_storage":  # a tensor whose shape claims far more elements than its 4-element storage holds
        big = b"J" + struct.pack("<i", draw(st.sampled_from([2**31 - 1, 2**20, 65536])))
        shape = draw(st.sampled_from([big + big, big + b"K\x02", b"K\x02" + big]))
        return _torch_zip({"a": torch.ones(2, 2)}, lambda b: b.replace(b"K\x02K\x02\x86", shape + b"\x86", 1))
    values = draw(
        st.sampled_from(
            [
                {"a": 1},
                {1: torch.ones(1)},
                [torch.ones(1)],
                {"a": torch.ones(2).to_sparse()},
                {"a": torch.ones(1, dtype=torch.complex64)},
                {"a": {"b": torch.ones(1)}},
            ]
        )
    )
    return _torch_zip(values)


def run_bin(work: Path, data: bytes) -> str:
    src = _fresh(work, "pytorch_model.bin")
    src.write_bytes(data)
    out = _fresh(work, "out")
    return exercise("bin", data, ["convert", src, "-o", out], out)


@budget(4)
@given(data=bin_bytes())
def test_fuzz_bin_pickles(work, data):
    run_bin(work, data)


def test_payloads_would_run_code_without_weights_only(work):
    """The payloads are real: plain unpickling runs them (so the marker is a meaningful witness)."""
    for payload in _payloads()[:2]:
        MARKER.unlink(missing_ok=True)
        pickle.loads(pickle.dumps(payload))
        assert MARKER.exists()
    MARKER.unlink(missing_ok=True)
    assert run_bin(work, _torch_zip({"x": _payloads()[0]})) == "refused" and not MARKER.exists()


# -- adapter_config.json ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_folder(work, tiny_model) -> tuple[Path, dict]:
    from safetensors.torch import save_file

    folder = work / "adapter"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for proj in ("q_proj", "v_proj"):
        key = f"base_model.model.model.layers.0.self_attn.{proj}"
        rows = 64 if proj == "q_proj" else 32  # tiny llama: 4 query heads, 2 kv heads of 16
        tensors[f"{key}.lora_A.weight"] = torch.randn(4, 64, generator=gen)
        tensors[f"{key}.lora_B.weight"] = torch.randn(rows, 4, generator=gen)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "base_model_name_or_path": "llama",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tiny_model("llama"), config


_REGEXES = ["q_proj", ".*", "(", "[a-", "a{2,1}", "(?P<x>", "\\", "q_proj|v_proj", "*", "(a+)+b", "(?<=a+)b"]


@st.composite
def adapter_config_bytes(draw, base: dict) -> bytes:
    config = dict(base)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from([*base, "unknown_field", "layer_replication", "loftq_config"]))
        action = draw(st.sampled_from(["junk", "delete", "regex", "number"]))
        if action == "delete":
            config.pop(key, None)
        elif action == "regex":
            config[key] = draw(
                st.dictionaries(st.sampled_from(_REGEXES), st.integers(-2, 8) | json_values, max_size=2)
                | st.lists(st.sampled_from(_REGEXES), max_size=2)
                | st.sampled_from(_REGEXES)
            )
        elif action == "number":
            config[key] = draw(st.sampled_from([0, -1, 4, 4.5, 2**64, float("nan"), float("inf"), True, "4"]))
        else:
            config[key] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"[]", b"null", b"{", b"\xff\xfe", b'{"r": 4, "r": 8}']))
    return _dump_json(config)


def run_adapter(adapter_folder, work: Path, data: bytes) -> str:
    base, _ = adapter_folder
    adapter = _fresh(work, "adapter-fuzzed")
    shutil.copytree(work / "adapter", adapter)
    (adapter / "adapter_config.json").write_bytes(data)
    out = _fresh(work, "out")
    return exercise("adapter_config", data, ["lora", "merge", base, adapter, "-o", out], out)


@budget(1)
@given(data=st.data())
def test_fuzz_adapter_config(adapter_folder, work, data):
    run_adapter(adapter_folder, work, data.draw(adapter_config_bytes(adapter_folder[1])))


def test_the_unmutated_adapter_folds(adapter_folder, work):
    assert run_adapter(adapter_folder, work, json.dumps(adapter_folder[1]).encode()) == "accepted"


# -- config.json --------------------------------------------------------------------------------------------------

_CONFIG_KEYS = [
    "architectures",
    "model_type",
    "tie_word_embeddings",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "head_dim",
]


@st.composite
def config_bytes(draw, base: dict) -> bytes:
    config = dict(base)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(_CONFIG_KEYS))
        if draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = draw(
                json_values
                | st.sampled_from([["LlamaForCausalLM"], ["Nope"], [1], "LlamaForCausalLM", 0, -1, 2**40, "bert"])
            )
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"[]", b"", b"{", b"\xff", b"[" * 100000]))
    return _dump_json(config)


def run_config(tiny_model, work: Path, command: str, data: bytes) -> str:
    src = _fresh(work, "configured")
    shutil.copytree(tiny_model("llama"), src)
    (src / "config.json").write_bytes(data)
    out = _fresh(work, "out")
    argv = {
        "convert": ["convert", src, "-o", out, "--dtype", "bfloat16"],
        "quantize": ["quantize", src, "-o", out, "--scheme", "int8"],
    }[command]
    return exercise("config", data, argv, out)


@budget(1)
@given(data=st.data())
def test_fuzz_config_json(tiny_model, work, data):
    base = json.loads((tiny_model("llama") / "config.json").read_text())
    command = data.draw(st.sampled_from(["convert", "quantize"]))
    run_config(tiny_model, work, command, data.draw(config_bytes(base)))


# -- merge and recipe YAML ----------------------------------------------------------------------------------------


def alias_bomb(levels: int, fanout: int, root: str) -> str:
    """The "billion laughs" document: each anchor repeats the previous one ``fanout`` times."""
    lines = ["l0: &l0 [x]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]")
    lines.append(f"{root}: *l{levels}")
    return "\n".join(lines) + "\n"


yaml_scalars = st.none() | st.booleans() | st.integers(-5, 10) | st.floats(-2, 2) | st.text(max_size=8)
yaml_values = st.recursive(
    yaml_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6
)


@st.composite
def yaml_text(draw, document) -> bytes:
    import yaml

    kind = draw(st.integers(0, 19))
    if kind == 0:
        return alias_bomb(
            draw(st.integers(1, 9)), draw(st.integers(2, 12)), draw(st.sampled_from(["models", "steps"]))
        ).encode()
    if kind == 1:
        return draw(
            st.sampled_from(
                [
                    b"- a\n- b\n",
                    b"3",
                    b"",
                    b"a: &a [*a]\n",
                    b"a: !!python/object:os.system x\n",
                    b"\xff\xfe",
                    b"a:\n\tb: 1\n",
                    b"[" * 5000,
                    b"a: !!binary AAAA\n",
                    b"a: 2026-11-30\n",
                    b"? [a, b]\n: 1\n",
                    b"---\na: 1\n---\nb: 2\n",
                ]
            )
        )
    return yaml.safe_dump(draw(document), allow_unicode=True).encode("utf-8", "surrogatepass")


@st.composite
def merge_documents(draw, models: list[str]):
    paths = st.sampled_from(models) | yaml_values
    params = st.dictionaries(
        st.sampled_from(["weight", "density", "t", "lambda", "normalize", "gamma", "epsilon", "nope"]),
        st.floats(0, 1)
        | st.lists(st.floats(0, 1), max_size=3)
        | yaml_values
        | st.lists(
            st.fixed_dictionaries({"filter": st.sampled_from(["mlp", "*", "x"]), "value": st.floats(0, 1)}), max_size=2
        ),
        max_size=3,
    )
    doc = {
        "merge_method": draw(
            st.sampled_from(["linear", "ties", "slerp", "task_arithmetic", "dare_ties", "nope"]) | yaml_values
        ),
        "models": draw(
            st.lists(
                st.fixed_dictionaries({"model": paths}, optional={"parameters": params, "x": yaml_values}) | paths,
                max_size=3,
            )
            | yaml_values
        ),
    }
    for key, value in draw(
        st.dictionaries(
            st.sampled_from(
                ["base_model", "parameters", "dtype", "out_dtype", "tokenizer_source", "slices", "unknown"]
            ),
            paths | params | st.sampled_from(["bfloat16", "float32", "int3"]),
            max_size=3,
        )
    ).items():
        doc[key] = value
    return doc


@pytest.fixture(scope="module")
def merge_models(tiny_model) -> list[str]:
    return [str(tiny_model("llama")), str(tiny_model("llama", seed=1)), "/no/such/model"]


def run_merge(work: Path, data: bytes) -> str:
    config = _fresh(work, "merge.yaml")
    config.write_bytes(data)
    out = _fresh(work, "out")
    return exercise("merge", data, ["merge", config, "-o", out], out)


@budget(2)
@given(data=st.data())
def test_fuzz_merge_yaml(merge_models, work, data):
    run_merge(work, data.draw(yaml_text(merge_documents(merge_models))))


@st.composite
def recipe_documents(draw, inputs: list[str], out: str):
    step_names = st.sampled_from(["lora_merge", "merge", "prune", "quantize", "distill", "export", "convert", "nope"])
    step_params = st.dictionaries(
        st.sampled_from(
            [
                "sparsity",
                "scheme",
                "adapters",
                "dtype",
                "method",
                "format",
                "shard_size",
                "ratio",
                "structured",
                "models",
                "merge_method",
                "out",
                "nope",
            ]
        ),
        st.sampled_from([0.5, "int8", "nf4", "bfloat16", "magnitude", "wanda", "onnx", "1MB", ["./a"], True])
        | yaml_values,
        max_size=3,
    )
    doc = {
        "input": draw(st.sampled_from(inputs) | yaml_values),
        "output": draw(st.just(out) | yaml_values),
        "steps": draw(
            st.lists(st.dictionaries(step_names, step_params | yaml_values, min_size=1, max_size=2), max_size=3)
            | yaml_values
        ),
    }
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["input", "extra", "steps"]))] = draw(yaml_values)
    return doc


def run_recipe(work: Path, data: bytes) -> str:
    recipe = _fresh(work, "recipe.yaml")
    recipe.write_bytes(data)
    return exercise("recipe", data, ["run", recipe, "--dry-run"])


@budget(3)
@given(data=st.data())
def test_fuzz_recipe_yaml(tiny_model, work, data):
    inputs = [str(tiny_model("llama")), "/no/such/model"]
    run_recipe(work, data.draw(yaml_text(recipe_documents(inputs, str(work / "recipe-out")))))


def test_alias_bombs_are_refused_quickly(work):
    for levels, fanout in ((9, 10), (30, 2)):
        assert run_merge(work, alias_bomb(levels, fanout, "models").encode()) == "refused"
        assert run_recipe(work, alias_bomb(levels, fanout, "steps").encode()) == "refused"


# -- the corpus of inputs that once broke something ---------------------------------------------------------------


@pytest.mark.parametrize("target,path", corpus_cases(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_corpus_replays(target, path, work, index_folder, adapter_folder, tiny_model, merge_models):
    data = path.read_bytes()
    if target == "safetensors":
        run_safetensors(work, data)
    elif target in ("index_safetensors", "index_bin"):
        run_index(index_folder, work, target.removeprefix("index_"), data)
    elif target == "bin":
        run_bin(work, data)
    elif target == "adapter_config":
        run_adapter(adapter_folder, work, data)
    elif target == "config":
        run_config(tiny_model, work, "convert", data)
        run_config(tiny_model, work, "quantize", data)
    elif target == "merge":
        run_merge(work, data)
    elif target == "recipe":
        run_recipe(work, data)
    else:
        raise AssertionError(f"unknown corpus target {target}")
