"""Weight files: safetensors headers parsed and checked up front, tensors read by positioned reads; weights-only
``.bin`` loading; file digests."""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from weightsmith.errors import CheckpointError

if TYPE_CHECKING:
    from weightsmith.checkpoint.gguf_file import GGUFFile

DEFAULT_SHARD_SIZE = 5 * 10**9  # bytes; the Hub's and transformers' default
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
MANIFEST = "weightsmith.manifest.json"  # what the writer wrote: sizes and sha256 of files, headers and tensors
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".h5",
    ".msgpack",
    ".index.json",
)
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header

# safetensors dtype codes ↔ torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
ST_CODES = {dtype: code for code, dtype in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What is known of a tensor without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # the weight file holding it, relative to the checkpoint

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# ---------------------------------------------------------------------------------------------------------------
# Weight files


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed and checked up front, tensors read on demand."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label
        st = path.stat()
        size = st.st_size
        self.identity = (st.st_ino, st.st_size, st.st_mtime_ns)  # a later read checks the file is still this one
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size} bytes (truncated?)")
            raw = f.read(n)
        header = parse_json_object(raw, f"{path}: malformed safetensors header")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{path}: malformed safetensors header (__metadata__ must map strings to strings)")
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + n
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {}
        data_size = size - self.data_start
        for name, spec in header.items():
            info, begin, end = _tensor_entry(path, label, name, spec)
            if end - begin != info.nbytes:
                raise CheckpointError(
                    f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {info.nbytes}"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {name!r} ends at byte {self.data_start + end}, the file has {size}"
                )
            self.entries[name] = (info, begin, end)
        _check_no_overlap(path, self.entries)

    def names(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k][1])  # storage order: sequential reads

    def location(self, name: str) -> tuple[Path, int, int]:
        """(file, absolute byte offset, byte count) of a tensor's data, for in-kernel copies."""
        _, begin, end = self.entries[name]
        return self.path, self.data_start + begin, end - begin

    def check_unchanged(self, fd: int, name: str) -> None:
        """Refuse to go on when the file was replaced or rewritten since its header was read: its tensors' bytes
        may no longer be where the header said (and the provenance digest no longer describes them)."""
        st = os.fstat(fd)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self.identity:
            raise CheckpointError(f"{self.path}: changed while being read (at tensor {name!r}); run again")

    def read(self, name: str) -> torch.Tensor:
        info, begin, end = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        unchanged = functools.partial(self.check_unchanged, name=name)
        read_span(self.path, self.data_start + begin, buf, unchanged, f"tensor {name!r}")
        return buf.view(info.dtype).reshape(info.shape)


def read_span(path: Path, offset: int, out: torch.Tensor, check: Callable[[int], None], what: str) -> None:
    """Fill ``out`` (a contiguous tensor) with the file's bytes from ``offset``, by positioned reads (safe from several
    threads: no shared file offset); ``check(fd)`` then refuses a file that changed while it was read. ``what`` names
    the bytes in the error a truncated file gives."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # the buffer protocol
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise CheckpointError(f"{path}: truncated while reading {what}")
            done += got
        check(fd)
    finally:
        os.close(fd)


def parse_json_object(raw: bytes | str, what: str) -> dict:
    """A JSON object in which no key appears twice (the second of a duplicate would silently win otherwise)."""
    try:
        value = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:200]
        raise CheckpointError(f"{what} ({reason})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} (expected a JSON object, found {type(value).__name__})")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _tensor_entry(path: Path, label: str, name: str, spec: object) -> tuple[TensorInfo, int, int]:
    """A header entry checked field by field: a known dtype, a shape of non-negative integers, two offsets."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r} has a malformed entry ({problem})")

    if not isinstance(spec, dict):
        raise bad("not an object")
    if set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad("expected exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise bad(f"unsupported dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad("shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int for x in offsets):
        raise bad("data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets [{begin}, {end}] are out of order")
    return TensorInfo(name, tuple(shape), ST_DTYPES[dtype], label), begin, end


def _check_no_overlap(path: Path, entries: dict[str, tuple[TensorInfo, int, int]]) -> None:
    """Refuse two tensors whose bytes overlap (a write into one would change the other)."""
    spans = sorted((begin, end, name) for name, (_, begin, end) in entries.items() if end > begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the file")


class TorchFile:
    """One ``pytorch_model*.bin`` file, loaded with ``weights_only=True`` (never arbitrary unpickling)."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label
        self.metadata: dict[str, str] = {}
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols; the refusal below says it all
                warnings.simplefilter("ignore")
                state = self._load(path)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: refused: it holds objects other than tensors ({_unpickler_reason(exc)}); weightsmith "
                f"loads .bin files with weights_only=True only and never unpickles arbitrary objects"
            ) from None
        except Exception as exc:  # torch's reader fails on malformed files with many exception types (IndexError,
            # KeyError, struct.error, MemoryError for sizes it cannot allocate…): all of them mean "not readable"
            first = (str(exc).splitlines() or [""])[0][:200]
            raise CheckpointError(
                f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {first})"
            ) from None
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, expected a dict of tensors")
        odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if odd:
            raise CheckpointError(
                f"{path}: entries that are not tensors: {', '.join(map(str, odd[:5]))}"
                f"{' …' if len(odd) > 5 else ''} (a training checkpoint? save the state_dict)"
            )
        for k, v in state.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{path}: a tensor name is a {type(k).__name__}, not a string")
            if v.layout != torch.strided or v.dtype not in ST_CODES or v.is_quantized or v.is_nested:
                raise CheckpointError(
                    f"{path}: tensor {k!r} is a {v.dtype} {str(v.layout).removeprefix('torch.')} tensor, "
                    f"which weightsmith does not read (dense tensors of the safetensors dtypes only)"
                )
        self.tensors: dict[str, torch.Tensor] = dict(state)
        self.entries = {k: (TensorInfo(k, tuple(v.shape), v.dtype, label), 0, 0) for k, v in self.tensors.items()}

    @staticmethod
    def _load(path: Path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name].clone()  # a private copy: callers may not write into a shared mmap


def _unpickler_reason(exc: Exception) -> str:
    """The useful part of torch's weights_only refusal, e.g. "Unsupported global: GLOBAL print"."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n|$)", str(exc))
    return match.group(1).strip() if match else "not a weights-only pickle"


def open_weight_file(path: Path, label: str) -> SafetensorsFile | TorchFile | GGUFFile:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path, label)
    if path.suffix in (".bin", ".pt", ".pth"):
        return TorchFile(path, label)
    if path.suffix == ".gguf":
        from weightsmith.checkpoint.gguf_file import GGUFFile  # not at the top: gguf_file imports this module

        return GGUFFile(path, label)
    raise CheckpointError(f"{path}: unsupported weight file (expected .safetensors, .bin or .gguf)")


# ---------------------------------------------------------------------------------------------------------------
# Writing
