"""Checkpoints as lazy tensor dicts: ``Checkpoint`` reads one tensor at a time, ``CheckpointWriter`` streams shards.

Reading never maps a whole file: each tensor is one positioned read into fresh memory, so the resident set stays at
about one tensor however large the checkpoint (mapped pages of a 70B file would count toward RSS as they are
touched). Writing streams tensor data straight into shard files and fills in their headers at commit, inside a
temporary sibling directory that is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import CheckpointError, DestinationError, WeightsmithError
from weightsmith.units import parse_size

DEFAULT_SHARD_SIZE = 5 * 10**9  # bytes; the Hub's and transformers' default
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".onnx_data", ".gguf", ".h5",
                    ".msgpack", ".index.json")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header

# safetensors dtype codes ↔ torch dtypes
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_ST_CODES = {dtype: code for code, dtype in _ST_DTYPES.items()}


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


class _SafetensorsFile:
    """One ``.safetensors`` file: header parsed and checked up front, tensors read on demand."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size} bytes (truncated?)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: malformed safetensors header ({exc})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[TensorInfo, int, int]] = {}
        data_size = size - self.data_start
        for name, spec in header.items():
            try:
                dtype = _ST_DTYPES[spec["dtype"]]
                shape = tuple(int(d) for d in spec["shape"])
                begin, end = (int(x) for x in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name!r} has a malformed or unsupported entry {spec}") from None
            info = TensorInfo(name, shape, dtype, label)
            if end - begin != info.nbytes or begin < 0:
                raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {info.nbytes}")
            if end > data_size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {name!r} ends at byte {self.data_start + end}, the file has {size}")
            self.entries[name] = (info, begin, end)

    def names(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k][1])  # storage order: sequential reads

    def location(self, name: str) -> tuple[Path, int, int]:
        """(file, absolute byte offset, byte count) of a tensor's data, for in-kernel copies."""
        _, begin, end = self.entries[name]
        return self.path, self.data_start + begin, end - begin

    def read(self, name: str) -> torch.Tensor:
        info, begin, end = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):  # positioned reads: safe from several threads, no shared file offset
                got = os.preadv(fd, [view[done:]], self.data_start + begin + done)
                if got == 0:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
                done += got
        finally:
            os.close(fd)
        return buf.view(info.dtype).reshape(info.shape)


class _TorchFile:
    """One ``pytorch_model*.bin`` file, loaded with ``weights_only=True`` (never arbitrary unpickling)."""

    def __init__(self, path: Path, label: str):
        self.path, self.label, self.metadata = path, label, {}
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols; the refusal below says it all
                warnings.simplefilter("ignore")
                state = self._load(path)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: refused: it holds objects other than tensors ({_unpickler_reason(exc)}); weightsmith "
                f"loads .bin files with weights_only=True only and never unpickles arbitrary objects") from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable PyTorch weights file ({str(exc).splitlines()[0]})") from None
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, expected a dict of tensors")
        odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if odd:
            raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, odd[:5]))}"
                                  f"{' …' if len(odd) > 5 else ''} (a training checkpoint? save the state_dict)")
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


def _open_weight_file(path: Path, label: str) -> _SafetensorsFile | _TorchFile:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path, label)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _TorchFile(path, label)
    raise CheckpointError(f"{path}: unsupported weight file (expected .safetensors or .bin)")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _shards_from_index(root: Path, index_path: Path) -> list[tuple[Path, set[str]]]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map")
    by_file: dict[str, set[str]] = {}
    for name, rel in weight_map.items():
        by_file.setdefault(rel, set()).add(name)
    shards = []
    for rel, names in by_file.items():
        target = (root / rel).resolve()
        if Path(rel).is_absolute() or not target.is_relative_to(root.resolve()):
            raise CheckpointError(f"{index_path}: shard {rel!r} lies outside the checkpoint directory")
        if not target.is_file():
            raise CheckpointError(f"{index_path}: names shard {rel!r}, which is missing")
        shards.append((root / rel, names))
    return shards


class Checkpoint(Mapping[str, torch.Tensor]):
    """A read-only, lazy tensor dict over a model directory, a weight file or a PEFT adapter directory.

    ``ckpt[name]`` reads that tensor (a fresh, writable tensor each time); ``ckpt.info(name)`` gives its shape and
    dtype without reading. Iteration follows storage order so that a full pass reads each file sequentially.

    >>> ckpt = weightsmith.open("path/to/model")            # doctest: +SKIP
    >>> ckpt.info("model.embed_tokens.weight").shape         # doctest: +SKIP
    (32000, 4096)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.config: dict | None = None
        self.adapter_config: dict | None = None
        self.index_file: Path | None = None
        files = self._locate_files()
        self._files = [_open_weight_file(p, str(p.relative_to(self.root))) for p in files]
        self._where: dict[str, Any] = {}
        for wf in self._files:
            for name in wf.names():
                if name in self._where:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} appears in both {self._where[name].label} and {wf.label}")
                self._where[name] = wf
        if self.index_file is not None:
            self._check_index_agrees()
        self._order = list(self._where)
        self.history: list[dict] = _recorded_steps(self.metadata)  # the steps that made these tensors

    # -- layout ---------------------------------------------------------------------------------------------------

    def _locate_files(self) -> list[Path]:
        p = self.path
        if p.is_file():
            return [p]
        if (p / ADAPTER_CONFIG).is_file():
            self.adapter_config = _read_json(p / ADAPTER_CONFIG)
            for name in ("adapter_model.safetensors", "adapter_model.bin"):
                if (p / name).is_file():
                    return [p / name]
            raise CheckpointError(f"{p}: adapter directory without adapter_model.safetensors or adapter_model.bin")
        if (p / "config.json").is_file():
            self.config = _read_json(p / "config.json")
        for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
            if (p / index_name).is_file():
                self.index_file = p / index_name
                self._index_shards = _shards_from_index(p, self.index_file)
                return [shard for shard, _ in self._index_shards]
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                return [p / name]
        found = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        if found:
            return found
        if not any(p.iterdir()):
            raise CheckpointError(f"{p}: empty directory")
        raise CheckpointError(f"{p}: no weights found (expected model.safetensors, a sharded index, "
                              f"pytorch_model.bin or adapter_model.safetensors)")

    def _check_index_agrees(self) -> None:
        for shard, names in self._index_shards:
            label = str(shard.relative_to(self.root))
            stored = {n for n, wf in self._where.items() if wf.label == label}
            if names - stored:
                missing = sorted(names - stored)
                raise CheckpointError(f"{self.index_file}: {len(missing)} tensor(s) listed for {label} are not in it, "
                                      f"e.g. {missing[0]!r}")
            if stored - names:
                extra = sorted(stored - names)
                raise CheckpointError(f"{shard}: holds {len(extra)} tensor(s) the index does not list, e.g. {extra[0]!r}")

    # -- Mapping --------------------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"

    # -- facts without reading data -------------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        return self._where[name].entries[name][0]

    def location(self, name: str) -> tuple[Path, int, int] | None:
        """Where a tensor's bytes lie on disk (file, offset, count), or None when they are not stored raw (.bin)."""
        wf = self._where[name]
        return wf.location(name) if isinstance(wf, _SafetensorsFile) else None

    def infos(self) -> list[TensorInfo]:
        return [self.info(n) for n in self._order]

    @property
    def is_adapter(self) -> bool:
        return self.adapter_config is not None

    @property
    def format(self) -> str:
        return "safetensors" if isinstance(self._files[0], _SafetensorsFile) else "pytorch"

    @property
    def weight_files(self) -> list[Path]:
        return [wf.path for wf in self._files]

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` of the first weight file (provenance lives here)."""
        return dict(self._files[0].metadata)

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos())

    @property
    def carry_files(self) -> list[Path]:
        """Non-weight files to copy into an output (tokenizer, generation config, sub-folders such as 1_Pooling).

        config.json and adapter_config.json are excluded: the writer writes the (possibly rewritten) config itself.
        """
        if not self.path.is_dir():
            return []
        out = []
        for entry in sorted(self.path.iterdir()):
            if entry.name.startswith(".") or entry.name in ("config.json", ADAPTER_CONFIG):
                continue
            if entry.is_file() and not entry.name.endswith(_WEIGHT_SUFFIXES):
                out.append(entry)
            elif entry.is_dir() and not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in entry.rglob("*")):
                out.append(entry)
        return out

    @property
    def tied_weights(self) -> dict[str, str]:
        """Output-embedding names that are not stored because they share the input embedding: {missing: stored}."""
        if self.config is None or not self.config.get("tie_word_embeddings", True):
            return {}
        archs = " ".join(self.config.get("architectures") or [])
        heads = {"CausalLM": "lm_head.weight", "LMHead": "lm_head.weight", "MaskedLM": "cls.predictions.decoder.weight"}
        head = next((h for key, h in heads.items() if key in archs), None)
        if head is None or head in self:
            return {}
        embed = next((n for n in self._order if re.search(r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$", n)),
                     None)
        return {head: embed} if embed else {}

    def digest(self) -> str:
        """sha256 of the weights: of the file itself for a single file, else of the per-file digests."""
        digests = [(str(p.relative_to(self.root)), file_sha256(p)) for p in self.weight_files]
        if len(digests) == 1:
            return digests[0][1]
        return hashlib.sha256("".join(f"{n}:{d}\n" for n, d in digests).encode()).hexdigest()


def _recorded_steps(metadata: Mapping[str, str]) -> list[dict]:
    """The provenance steps a weightsmith output recorded ([] for other files or unreadable metadata)."""
    try:
        steps = json.loads(metadata.get("weightsmith", "{}")).get("steps", [])
    except (ValueError, AttributeError):
        return []
    return [s for s in steps if isinstance(s, dict) and isinstance(s.get("inputs", []), list)]


def open(path: str | os.PathLike) -> Checkpoint:  # noqa: A001 - the public verb, as in safetensors.safe_open
    """Open a checkpoint lazily: a model directory, a ``.safetensors``/``.bin`` file, or a PEFT adapter directory."""
    return Checkpoint(path)


class CheckpointView(Checkpoint):
    """A lazy transform of a checkpoint with the same reader interface: tensors are computed when read.

    This is how streamed steps chain without intermediate files: a view is accepted wherever a Checkpoint is, and
    the writer records the view's steps in the output's provenance. A subclass overrides ``__getitem__`` and, where
    names, shapes or dtypes change, ``_order``, ``info`` and ``config``. Files, carried files and digests are the
    source's.
    """

    def __init__(self, source: Checkpoint, step: dict):
        self.source = source
        self.path, self.root = source.path, source.root
        self.config, self.adapter_config, self.index_file = source.config, source.adapter_config, None
        self._files = source._files
        self._order = list(source)
        self.history = [*source.history, step]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source[name]

    def __contains__(self, name: object) -> bool:
        return name in self._order

    def info(self, name: str) -> TensorInfo:
        return self.source.info(name)

    def location(self, name: str) -> tuple[Path, int, int] | None:
        return None  # computed tensors have no bytes on disk

    @property
    def carry_files(self) -> list[Path]:
        return self.source.carry_files

    @property
    def tied_weights(self) -> dict[str, str]:
        return self.source.tied_weights

    def digest(self) -> str:
        return self.source.digest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        buf = bytearray(16 * 2**20)
        view = memoryview(buf)
        with path.open("rb") as f:
            while n := f.readinto(buf):
                h.update(view[:n])  # hashlib releases the GIL on large buffers: digests run beside the work
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


# ---------------------------------------------------------------------------------------------------------------
# Writing


def provenance_step(operation: str, parameters: Mapping[str, Any], inputs: Sequence[Checkpoint | str | Path]) -> dict:
    """One step of an output's history: what was done, with which parameters, to which inputs."""
    return {"operation": operation, "parameters": dict(parameters), "inputs": list(inputs)}


def _json_default(value: Any) -> Any:
    if isinstance(value, (Path, torch.dtype)):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # one write may stop short (Linux caps it near 2 GiB)
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class _Shard:
    """A shard being written: tensor data streams in after a reserved header block, the header comes at commit."""

    # Room left for the JSON header in large shards, so it can be filled in place. Small shards are rewritten
    # compactly instead (cheap), as is any shard whose header outgrows the room.
    RESERVED = 64 * 2**10
    IN_PLACE_MIN_BYTES = 64 * 2**20

    def __init__(self, path: Path, io: ThreadPoolExecutor):
        self.path, self.io = path, io
        self.file = path.open("wb", buffering=0)
        self.entries: dict[str, dict] = {}
        self.size = 0
        self._pending: Future | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a tensor's bytes for the I/O thread, which writes while the caller computes the next tensor.
        At most one write is in flight, so memory holds at most one tensor beyond the caller's."""
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = 8 + self.RESERVED + self.size
        self.entries[name] = {"dtype": _ST_CODES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.size, self.size + data.nbytes]}
        self.size += data.nbytes
        self.wait()
        self._pending = self.io.submit(_pwrite_all, self.file.fileno(), memoryview(data), offset)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failed write (disk full…) here, in the caller's thread

    def copy(self, name: str, info: TensorInfo, location: tuple[Path, int, int]) -> None:
        """Append a tensor's bytes straight from another file (in the kernel where the OS can)."""
        src_path, offset, count = location
        with src_path.open("rb", buffering=0) as src:
            done = 0
            try:
                while done < count:
                    n = os.copy_file_range(src.fileno(), self.file.fileno(), count - done, offset + done,
                                           8 + self.RESERVED + self.size + done)
                    if n == 0:
                        raise CheckpointError(f"{src_path}: truncated while copying tensor {name!r}")
                    done += n
            except OSError:  # no copy_file_range across these files: copy through user space
                src.seek(offset + done)
                while done < count:
                    chunk = memoryview(src.read(min(count - done, 64 * 2**20)))
                    if not chunk:
                        raise CheckpointError(f"{src_path}: truncated while copying tensor {name!r}") from None
                    _pwrite_all(self.file.fileno(), chunk, 8 + self.RESERVED + self.size + done)
                    done += len(chunk)
        self.entries[name] = {"dtype": _ST_CODES[info.dtype], "shape": list(info.shape),
                              "data_offsets": [self.size, self.size + count]}
        self.size += count

    def finish(self, metadata: dict[str, str], final_path: Path) -> None:
        self.wait()
        self.file.close()
        header = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode()
        if len(header) <= self.RESERVED and self.size >= self.IN_PLACE_MIN_BYTES:
            with self.path.open("r+b") as f:
                f.write(self.RESERVED.to_bytes(8, "little") + header.ljust(self.RESERVED, b" "))
            self.path.rename(final_path)
            return
        header = header.ljust(-(-len(header) // 8) * 8, b" ")  # data aligned to 8 bytes, as safetensors does
        with self.path.open("rb") as src, final_path.open("wb") as dst:
            dst.write(len(header).to_bytes(8, "little") + header)
            src.seek(8 + self.RESERVED)
            shutil.copyfileobj(src, dst, 16 * 2**20)
        self.path.unlink()


class CheckpointWriter:
    """Streams tensors into a transformers-style directory, atomically.

    Tensors go to disk as they arrive (``write``); shards roll over at ``shard_size`` bytes. ``commit`` writes the
    headers, the index, config.json and the carried files, then renames the temporary sibling directory into place.
    Used as a context manager it commits on success and removes everything on any exception or Ctrl-C.

    >>> with CheckpointWriter("out", steps=[provenance_step("convert", {}, [src])], config=src.config) as w:  # doctest: +SKIP
    ...     for name in src:
    ...         w.write(name, src[name])
    """

    def __init__(self, out: str | os.PathLike, *, steps: Sequence[dict], config: dict | None = None,
                 carry: Sequence[Path] = (), dtype: torch.dtype | None = None,
                 shard_size: int | str = DEFAULT_SHARD_SIZE, force: bool = False, prefix: str = "model",
                 index_name: str | None = SAFETENSORS_INDEX):
        self.out = Path(out)
        self.force, self.dtype, self.prefix, self.index_name = force, dtype, prefix, index_name
        self.shard_size = parse_size(shard_size)
        self.config = dict(config) if config is not None else None
        self.carry = list(carry)
        self.files: dict[str, bytes] = {}
        check_destination(self.out, force)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.out.parent / f".{self.out.name}.weightsmith-{uuid.uuid4().hex[:8]}"
            self.tmp.mkdir()
        except OSError as exc:
            raise DestinationError(f"{self.out}: cannot write here ({exc.strerror or exc})") from None
        self._shards: list[_Shard] = []
        self._names: set[str] = set()
        self.total_size = 0
        self._pool = ThreadPoolExecutor(max_workers=1)  # hashes the inputs beside the work
        self._io = ThreadPoolExecutor(max_workers=1)  # writes tensor data beside the work
        self.steps = [self._resolve_step(s) for s in _with_history(steps)]

    def _resolve_step(self, step: dict) -> dict:
        resolved = []
        for item in step.get("inputs", []):
            if isinstance(item, dict):  # an already resolved step (from an input's history)
                resolved.append(item)
                continue
            ckpt = item if isinstance(item, Checkpoint) else None
            path = str(ckpt.path if ckpt else item)
            digest: Future | None = self._pool.submit(ckpt.digest) if ckpt else None
            entry = {"path": path, "sha256": digest}
            if isinstance(ckpt, CheckpointView):  # read through lazily applied steps
                entry["via"] = [h["operation"] for h in ckpt.history[len(ckpt.source.history):]]
            resolved.append(entry)
        return {**step, "inputs": resolved}

    # -- streaming ------------------------------------------------------------------------------------------------

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (cast to the writer's dtype if it is a float tensor)."""
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        self._shard_for(name, tensor.numel() * tensor.element_size()).write(name, tensor)

    def write_from(self, source: Checkpoint, name: str) -> None:
        """Copy one tensor of ``source`` unchanged (except for the writer's cast), without decoding it when the
        bytes can be copied as they are."""
        info = source.info(name)
        location = source.location(name)
        casts = self.dtype is not None and info.dtype.is_floating_point and info.dtype != self.dtype
        if location is None or casts:
            self.write(name, source[name])
        else:
            self._shard_for(name, info.nbytes).copy(name, info, location)

    def _shard_for(self, name: str, nbytes: int) -> _Shard:
        if name in self._names:
            raise WeightsmithError(f"{self.out}: tensor {name!r} written twice")
        if not self._shards or (self._shards[-1].size and self._shards[-1].size + nbytes > self.shard_size):
            if self._shards:
                self._shards[-1].wait()
            self._shards.append(_Shard(self.tmp / f".shard-{len(self._shards)}.partial", self._io))
        self._names.add(name)
        self.total_size += nbytes
        return self._shards[-1]

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def add_file(self, relpath: str, content: str | bytes) -> None:
        """A small extra file for the output directory (e.g. a README or adapter_config.json)."""
        self.files[relpath] = content.encode() if isinstance(content, str) else content

    # -- finishing ------------------------------------------------------------------------------------------------

    def commit(self) -> Path:
        """Finish every file and move the directory into place; returns the output path."""
        if not self._shards:
            raise WeightsmithError(f"{self.out}: nothing to write (no tensors)")
        for step in self.steps:
            for item in step["inputs"]:
                if isinstance(item.get("sha256"), Future):
                    item["sha256"] = item["sha256"].result()
        self._pool.shutdown()
        for shard in self._shards:
            shard.wait()
        self._io.shutdown()
        metadata = {"format": "pt", "weightsmith": json.dumps(
            {"version": _version(), "steps": self.steps}, default=_json_default, separators=(",", ":"))}
        n = len(self._shards)
        weight_map = {}
        for i, shard in enumerate(self._shards):
            fname = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            shard.finish(metadata, self.tmp / fname)
            weight_map.update(dict.fromkeys(shard.entries, fname))
        if n > 1:
            if self.index_name is None:
                raise WeightsmithError(f"{self.out}: this output must be a single file; raise the shard size")
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / self.index_name).write_text(json.dumps(index, indent=2) + "\n")
        for src in self.carry:
            if src.is_dir():
                shutil.copytree(src, self.tmp / src.name)
            else:
                shutil.copy2(src, self.tmp / src.name)
        if self.config is not None:
            if self.dtype is not None:
                _set_config_dtype(self.config, self.dtype)
            (self.tmp / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        for rel, content in self.files.items():
            (self.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.tmp / rel).write_bytes(content)
        _move_into_place(self.tmp, self.out, self.force)
        return self.out

    def abort(self) -> None:
        """Remove everything written so far; the destination is untouched."""
        self._io.shutdown(wait=True)  # let an in-flight write finish before its file goes
        for shard in self._shards:
            shard.file.close()
        self._pool.shutdown(cancel_futures=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing non-empty destination unless ``force``; refuse a destination inside a file."""
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        if not force:
            raise DestinationError(f"{out}: already exists and is not empty (use --force to replace it)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DestinationError(f"{out}: cannot write here ({parent} is a file)")
            if not os.access(parent, os.W_OK):
                raise DestinationError(f"{out}: cannot write here ({parent} is not writable)")
            break


def _with_history(steps: Sequence[dict]) -> list[dict]:
    """The steps, each preceded by the lazily applied steps of the views it read (each recorded once)."""
    out: list[dict] = []
    for step in steps:
        for item in step.get("inputs", []):
            if isinstance(item, Checkpoint):
                out.extend(h for h in _with_history(item.history) if not any(h is o for o in out))
        out.append(step)
    return out


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    check_destination(out, force)  # again: something may have appeared while we worked
    trash = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            trash = out.parent / f".{out.name}.weightsmith-old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
    tmp.rename(out)
    if trash is not None:
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()


def _set_config_dtype(config: dict, dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = name


def _version() -> str:
    from weightsmith import __version__

    return __version__


def save(tensors: Mapping[str, torch.Tensor], out: str | os.PathLike, *, config: dict | None = None,
         operation: str = "save", parameters: Mapping[str, Any] | None = None,
         inputs: Sequence[Checkpoint | str | Path] = (), **writer_options: Any) -> Path:
    """Write a tensor dict (any Mapping, lazy ones included) as a transformers-style directory, atomically.

    >>> weightsmith.save({"w": torch.zeros(2, 2)}, "out_dir")  # doctest: +SKIP
    """
    steps = [provenance_step(operation, parameters or {}, inputs)]
    with CheckpointWriter(out, steps=steps, config=config, **writer_options) as writer:
        for name in tensors:
            writer.write(name, tensors[name])
    return Path(out)
