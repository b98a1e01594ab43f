"""``CheckpointWriter``: tensors stream into safetensors shards inside a temporary sibling directory, which is
renamed into place only when everything succeeded; provenance goes into every shard's metadata, and the sha256 of
every tensor, header and file written goes into a manifest beside them (``weightsmith.manifest.json``), which
``weightsmith verify`` checks the output against."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.checkpoint.files import DEFAULT_SHARD_SIZE, MANIFEST, SAFETENSORS_INDEX, ST_CODES, TensorInfo
from weightsmith.checkpoint.reader import TensorSource
from weightsmith.checkpoint.staging import DestinationLock, move_into_place, staging_dir, storage_errors, sweep
from weightsmith.checkpoint.view import CheckpointView
from weightsmith.errors import CheckpointError, DestinationError, StorageError, WeightsmithError
from weightsmith.units import parse_size

MANIFEST_FORMAT = "weightsmith-manifest/1"
PIECE_BYTES = 4 * 2**20  # a tensor written by rows goes out in pieces of about this size


@dataclass(frozen=True)
class Rows:
    """An output tensor computed a block of rows at a time, straight into the writer's buffers: ``fill(out, i, j)``
    writes rows i..j of the tensor, seen as ``[shape[0], rest]``, into ``out`` (that 2-D shape, ``dtype``). Every
    block but the last is a multiple of ``unit`` rows, so a producer that works in blocks of ``unit`` rows meets the
    same block boundaries as it would on the whole tensor. No buffer the size of the tensor is ever made."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: Callable[[torch.Tensor, int, int], None]
    unit: int = 1


def provenance_step(operation: str, parameters: Mapping[str, Any], inputs: Sequence[TensorSource | str | Path]) -> dict:
    """One step of an output's history: what was done, with which parameters, to which inputs."""
    return {"operation": operation, "parameters": dict(parameters), "inputs": list(inputs)}


def resolve_steps(steps: Sequence[dict], submit: Callable[..., Future] | None = None) -> list[dict]:
    """Steps with their inputs' own histories put first and each input turned into {path, sha256 (a Future), via}.

    ``submit`` runs the digests (e.g. a thread pool's, so that they run beside the work); default: right away."""
    submit = submit or _run_now
    resolved = []
    for step in _with_history(steps):
        inputs: list[dict] = []
        for item in step.get("inputs", []):
            if isinstance(item, dict):  # already resolved (a step recorded in an input's metadata)
                inputs.append(item)
                continue
            ckpt = item if isinstance(item, TensorSource) else None
            entry: dict[str, Any] = {
                "path": str(ckpt.path if ckpt else item),
                "sha256": submit(ckpt.digest) if ckpt else None,
            }
            if isinstance(ckpt, CheckpointView):  # read through lazily applied steps
                entry["via"] = [h["operation"] for h in ckpt.history[len(ckpt.source.history) :]]
            inputs.append(entry)
        resolved.append({**step, "inputs": inputs})
    return resolved


def provenance_record(steps: list[dict]) -> str:
    """The JSON stored under the ``weightsmith`` metadata key: version and steps, digests waited for."""
    for step in steps:
        for item in step["inputs"]:
            if isinstance(item.get("sha256"), Future):
                item["sha256"] = item["sha256"].result()
    return json.dumps({"version": _version(), "steps": steps}, default=_json_default, separators=(",", ":"))


def _run_now(fn: Callable[[], str]) -> Future:
    done: Future = Future()
    done.set_result(fn())
    return done


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


def _sha256(data: memoryview) -> str:
    """sha256 of a tensor's bytes (hashlib releases the GIL: this runs beside the work and the write)."""
    return hashlib.sha256(data).hexdigest()


def _hash_range(fd: int, offset: int, count: int) -> str:
    """sha256 of ``count`` bytes of a file from ``offset``, read back through one 4 MiB buffer (a fresh buffer per
    piece would page-fault its memory in each time)."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(min(count, 4 * 2**20)))
    while count:
        n = os.preadv(fd, [buf[: min(count, len(buf))]], offset)
        if not n:
            raise CheckpointError(f"short read while hashing the bytes just written (fd {fd})")
        h.update(buf[:n])
        offset, count = offset + n, count - n
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a whole file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _hash_range(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class _Shard:
    """A shard being written: tensor data streams in after a reserved header block, the header comes at commit."""

    # Room left for the JSON header in large shards, so it can be filled in place. Small shards are rewritten
    # compactly instead (cheap), as is any shard whose header outgrows the room.
    RESERVED = 64 * 2**10
    IN_PLACE_MIN_BYTES = 64 * 2**20

    def __init__(self, path: Path, io: ThreadPoolExecutor, hasher: ThreadPoolExecutor):
        self.path, self.io, self.hasher = path, io, hasher
        self.file = path.open("w+b", buffering=0)  # read back too: copied tensors are hashed from what was written
        self.entries: dict[str, dict] = {}
        self.digests: dict[str, Future] = {}  # tensor name -> sha256 of its bytes as written
        self.size = 0
        self._pending: list[Future] = []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a tensor's bytes for the I/O thread, which writes them, and the hashing thread, which takes their
        sha256, while the caller computes the next tensor (on separate threads: writing into new page-cache pages
        and hashing each cost about as much as a fold's arithmetic). At most one tensor is in flight, so memory
        holds at most one tensor beyond the caller's."""
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = 8 + self.RESERVED + self.size
        self.entries[name] = {
            "dtype": ST_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.size, self.size + data.nbytes],
        }
        self.size += data.nbytes
        self.wait()
        view = memoryview(data)  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
        self.digests[name] = self.hasher.submit(_sha256, view)
        self._pending = [self.io.submit(_pwrite_all, self.file.fileno(), view, offset), self.digests[name]]

    def write_rows(self, name: str, rows: Rows, pieces: _Pieces) -> None:
        """Write a tensor piece by piece: each piece is filled by ``rows.fill`` in one of ``pieces``' buffers, then
        written and hashed (into one running sha256) while the next is filled. Memory: a few pieces, whatever the
        tensor's size."""
        numel = math.prod(rows.shape)
        nbytes = numel * rows.dtype.itemsize
        offset = 8 + self.RESERVED + self.size
        self.entries[name] = {
            "dtype": ST_CODES[rows.dtype],
            "shape": list(rows.shape),
            "data_offsets": [self.size, self.size + nbytes],
        }
        self.size += nbytes
        self.wait()
        digest = hashlib.sha256()
        count = rows.shape[0] if rows.shape else 1
        columns = numel // count if count else 0
        row_bytes = columns * rows.dtype.itemsize
        step = max(rows.unit, PIECE_BYTES // max(1, row_bytes) // rows.unit * rows.unit)
        for start in range(0, count, step):
            stop = min(start + step, count)
            buffer = pieces.take((stop - start) * row_bytes)
            rows.fill(buffer.view(rows.dtype).view(stop - start, columns), start, stop)
            view = memoryview(buffer.numpy())  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
            write = self.io.submit(_pwrite_all, self.file.fileno(), view, offset)
            pieces.hold(write, self.hasher.submit(digest.update, view))
            offset += len(view)
        self.digests[name] = self.hasher.submit(digest.hexdigest)
        self._pending = [*pieces.pending(), self.digests[name]]

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises a failed write (disk full…) here, in the caller's thread

    def wait_all(self) -> None:
        """Every write and hash of this shard done (re-raising the first failure)."""
        self.wait()
        for digest in self.digests.values():
            digest.result()

    def copy(self, name: str, info: TensorInfo, location: tuple[Path, int, int], check: Callable[[int], None]) -> None:
        """Append a tensor's bytes straight from another file (in the kernel where the OS can); ``check(fd)`` then
        refuses a source file that changed since its header was read."""
        src_path, offset, count = location
        with src_path.open("rb", buffering=0) as src:
            done = 0
            try:
                while done < count:
                    n = os.copy_file_range(
                        src.fileno(),
                        self.file.fileno(),
                        count - done,
                        offset + done,
                        8 + self.RESERVED + self.size + done,
                    )
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
            check(src.fileno())
        self.digests[name] = self.hasher.submit(_hash_range, self.file.fileno(), 8 + self.RESERVED + self.size, count)
        self.entries[name] = {
            "dtype": ST_CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [self.size, self.size + count],
        }
        self.size += count

    def finish(self, metadata: dict[str, str], final_path: Path) -> dict:
        """Write the header and give the file its final name; returns the shard's manifest entry (size, sha256 of
        the header, sha256 of each tensor's bytes in storage order: together they cover every byte of the file)."""
        self.wait_all()
        self.file.close()
        header = json.dumps({"__metadata__": metadata, **self.entries}, separators=(",", ":")).encode()
        if len(header) <= self.RESERVED and self.size >= self.IN_PLACE_MIN_BYTES:
            head = self.RESERVED.to_bytes(8, "little") + header.ljust(self.RESERVED, b" ")
            with self.path.open("r+b") as f:
                f.write(head)
            self.path.rename(final_path)
        else:
            header = header.ljust(-(-len(header) // 8) * 8, b" ")  # data aligned to 8 bytes, as safetensors does
            head = len(header).to_bytes(8, "little") + header
            with self.path.open("rb") as src, final_path.open("wb") as dst:
                dst.write(head)
                src.seek(8 + self.RESERVED)
                shutil.copyfileobj(src, dst, 16 * 2**20)
            self.path.unlink()
        return {
            "size": len(head) + self.size,
            "header_sha256": hashlib.sha256(head).hexdigest(),
            "tensors": {name: digest.result() for name, digest in self.digests.items()},
        }


class _Pieces:
    """The few buffers a writer fills tensors written by rows into, taken in turn: a buffer is handed out again only
    once the write and the hash of what it last held are done (so at most ``SLOTS`` pieces are in flight)."""

    SLOTS = 3

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._held: list[tuple[Future, ...]] = []
        self._turn = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of ``nbytes`` (uint8), free to fill."""
        slot = self._turn % self.SLOTS
        if slot == len(self._buffers):
            self._buffers.append(torch.empty(nbytes, dtype=torch.uint8))
            self._held.append(())
        for future in self._held[slot]:
            future.result()  # re-raises a failed write here, in the caller's thread
        if self._buffers[slot].numel() < nbytes:
            self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffers[slot][:nbytes]

    def hold(self, *futures: Future) -> None:
        """The work on the buffer last taken: it is not handed out again before these are done."""
        self._held[self._turn % self.SLOTS] = futures
        self._turn += 1

    def pending(self) -> list[Future]:
        return [future for held in self._held for future in held]


def _cast_rows(rows: Rows, dtype: torch.dtype) -> Rows:
    """``rows`` produced in ``dtype`` instead (the writer's cast), a piece at a time."""

    def fill(out: torch.Tensor, start: int, stop: int) -> None:
        piece = torch.empty(out.shape, dtype=rows.dtype)
        rows.fill(piece, start, stop)
        out.copy_(piece)

    return Rows(rows.shape, dtype, fill, rows.unit)


class CheckpointWriter:
    """Streams tensors into a transformers-style directory, atomically.

    Tensors go to disk as they arrive (``write``); shards roll over at ``shard_size`` bytes. ``commit`` writes the
    headers, the index, config.json and the carried files, then renames the temporary sibling directory into place.
    Used as a context manager it commits on success and removes everything on any exception or Ctrl-C.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> src = weightsmith.open(weightsmith.save({"w": torch.ones(2)}, f"{d}/src"))
    >>> steps = [provenance_step("convert", {}, [src])]
    >>> with CheckpointWriter(f"{d}/out", steps=steps, config=src.config) as w:
    ...     for name in src:
    ...         w.write(name, src[name])
    >>> list(weightsmith.open(f"{d}/out"))
    ['w']
    """

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        steps: Sequence[dict],
        config: dict | None = None,
        carry: Sequence[Path] = (),
        dtype: torch.dtype | None = None,
        shard_size: int | str = DEFAULT_SHARD_SIZE,
        force: bool = False,
        prefix: str = "model",
        index_name: str | None = SAFETENSORS_INDEX,
    ):
        self.out = Path(out)
        self.force, self.dtype, self.prefix, self.index_name = force, dtype, prefix, index_name
        self.shard_size = parse_size(shard_size)
        self.config = dict(config) if config is not None else None
        self.carry = list(carry)
        self.files: dict[str, bytes] = {}
        check_destination(self.out, force)
        with storage_errors(self.out):
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise DestinationError(f"{self.out}: cannot write here (a parent is a file)") from None
            self._lock = DestinationLock(self.out).acquire()  # one run per destination; released at the end
            try:
                self.swept = sweep(self.out)  # temporary folders of killed runs
                self.tmp = staging_dir(self.out)
            except BaseException:
                self._lock.release()
                raise
        self._shards: list[_Shard] = []
        self._names: set[str] = set()
        self.total_size = 0
        self._pool = ThreadPoolExecutor(max_workers=1)  # hashes the inputs beside the work
        self._io = ThreadPoolExecutor(max_workers=1)  # writes tensor data beside the work
        self._hasher = ThreadPoolExecutor(max_workers=1)  # hashes the output's tensors beside the work and the write
        self._pieces = _Pieces()  # buffers of the tensors written by rows
        try:
            self.steps = resolve_steps(steps, self._pool.submit)
        except BaseException:  # an error or Ctrl-C before the caller's ``with`` could clean up
            self.abort()
            raise

    # -- streaming ------------------------------------------------------------------------------------------------

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (cast to the writer's dtype if it is a float tensor)."""
        if self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        with storage_errors(self.out):
            self._shard_for(name, tensor.numel() * tensor.element_size()).write(name, tensor)

    def write_rows(self, name: str, rows: Rows) -> None:
        """Append one tensor computed by rows (``Rows``; cast to the writer's dtype if it is a float tensor)."""
        if self.dtype is not None and rows.dtype.is_floating_point and rows.dtype != self.dtype:
            rows = _cast_rows(rows, self.dtype)
        with storage_errors(self.out):
            self._shard_for(name, math.prod(rows.shape) * rows.dtype.itemsize).write_rows(name, rows, self._pieces)

    def write_from(self, source: TensorSource, name: str, as_name: str | None = None) -> None:
        """Copy one tensor of ``source`` unchanged (except for the writer's cast), without decoding it when the
        bytes can be copied as they are; ``as_name`` renames it in the output."""
        info = source.info(name)
        location = source.location(name)
        out_name = as_name or name
        casts = self.dtype is not None and info.dtype.is_floating_point and info.dtype != self.dtype
        if location is None or casts:
            self.write(out_name, source[name])
        else:
            with storage_errors(self.out):
                unchanged = functools.partial(source.check_unchanged, name)  # the source's name, not the output's
                self._shard_for(out_name, info.nbytes).copy(out_name, info, location, unchanged)

    def _shard_for(self, name: str, nbytes: int) -> _Shard:
        if name in self._names:
            raise WeightsmithError(f"{self.out}: tensor {name!r} written twice")
        if not self._shards or (self._shards[-1].size and self._shards[-1].size + nbytes > self.shard_size):
            if self._shards:
                self._shards[-1].wait()
            self._shards.append(_Shard(self.tmp / f".shard-{len(self._shards)}.partial", self._io, self._hasher))
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
        with storage_errors(self.out):
            return self._commit()

    def _commit(self) -> Path:
        if not self._shards:
            raise WeightsmithError(f"{self.out}: nothing to write (no tensors)")
        record = provenance_record(self.steps)
        self._pool.shutdown()
        for shard in self._shards:
            shard.wait_all()
        self._io.shutdown()
        self._hasher.shutdown()
        metadata = {"format": "pt", "weightsmith": record}
        n = len(self._shards)
        weight_map = {}
        manifest: dict[str, dict] = {}
        for i, shard in enumerate(self._shards):
            fname = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            manifest[fname] = shard.finish(metadata, self.tmp / fname)
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
                set_config_dtype(self.config, self.dtype)
            (self.tmp / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        for rel, content in self.files.items():
            (self.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.tmp / rel).write_bytes(content)
        for path in sorted(self.tmp.rglob("*")):  # every other file: its size and sha256
            rel = path.relative_to(self.tmp).as_posix()
            if path.is_file() and rel not in manifest and rel != MANIFEST:
                manifest[rel] = {"size": path.stat().st_size, "sha256": file_digest(path)}
        (self.tmp / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": manifest}, indent=1) + "\n")
        move_into_place(self.tmp, self.out, self.force)
        self._lock.release()
        return self.out

    def abort(self) -> None:
        """Remove everything written so far; the destination is untouched."""
        self._io.shutdown(wait=True)  # let an in-flight write finish before its file goes
        self._hasher.shutdown(wait=True, cancel_futures=True)  # and a read-back hash before its descriptor closes
        for shard in self._shards:
            shard.file.close()
        self._pool.shutdown(cancel_futures=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._lock.release()

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
            raise DestinationError(f"{out}: already exists and is not empty (set `force` to replace it)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DestinationError(f"{out}: cannot write here ({parent} is a file)")
            if not os.access(parent, os.W_OK):
                raise StorageError(
                    f"{out}: cannot write: {parent} is not writable (read-only or forbidden); "
                    f"choose an output folder you may write to. Nothing was written"
                )
            break


def _with_history(steps: Sequence[dict]) -> list[dict]:
    """The steps, each preceded by the lazily applied steps of the views it read (each recorded once)."""
    out: list[dict] = []
    for step in steps:
        for item in step.get("inputs", []):
            if isinstance(item, TensorSource):
                out.extend(h for h in _with_history(item.history) if not any(h is o for o in out))
        out.append(step)
    return out


def set_config_dtype(config: dict, dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = name


def _version() -> str:
    from weightsmith import __version__

    return __version__


def save(
    tensors: Mapping[str, torch.Tensor],
    out: str | os.PathLike,
    *,
    config: dict | None = None,
    operation: str = "save",
    parameters: Mapping[str, Any] | None = None,
    inputs: Sequence[TensorSource | str | Path] = (),
    **writer_options: Any,
) -> Path:
    """Write a tensor dict (any Mapping, lazy ones included) as a transformers-style directory, atomically.

    >>> import tempfile
    >>> out = weightsmith.save({"w": torch.zeros(2, 2)}, tempfile.mkdtemp() + "/out")
    >>> weightsmith.open(out)["w"].shape
    torch.Size([2, 2])
    """
    from weightsmith.stream import stream

    carry = writer_options.pop("carry", ())
    stream(
        tensors,  # type: ignore[arg-type]  # any Mapping: the transform below reads it, nothing else of it is used
        out,
        operation=operation,
        params=parameters or {},
        inputs=inputs,
        transform=lambda name: [(name, tensors[name])],
        config=config,
        carry=carry,
        **writer_options,
    )
    return Path(out)
