"""``verify``: check a written checkpoint against what weightsmith recorded when it wrote it.

The writer leaves ``weightsmith.manifest.json`` beside the files it wrote: for every file its size, and for every
safetensors shard the sha256 of its header and of each tensor's bytes (in storage order, they cover every byte of the
shard), for every other file (index, config, tokenizer…) the sha256 of the whole file. The manifest is a separate
file so that recording a digest never changes what it describes. ``verify`` re-reads everything and names the first
file, header or tensor that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from weightsmith.checkpoint.files import MANIFEST, SafetensorsFile
from weightsmith.errors import CheckpointError
from weightsmith.report import Report
from weightsmith.units import format_size

_HEX64 = frozenset("0123456789abcdef")


def verify(path: str | os.PathLike) -> Report:
    """Check every file weightsmith wrote into ``path``: present, same size, same header, same bytes per tensor.

    Raises CheckpointError naming the first missing file, changed size, corrupted header or corrupted tensor.

    >>> ws.verify("merged/").summary["tensors"]  # doctest: +SKIP
    291
    """
    root = Path(path)
    if root.is_file():
        root = root.parent
    files = _read_manifest(root)
    report = Report("verify", output=None)
    checked_tensors = checked_bytes = 0
    for rel, entry in files.items():
        target = root / rel
        if not target.is_file():
            raise CheckpointError(f"{target}: missing (weightsmith wrote {entry['size']} bytes there)")
        size = target.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{target}: {size} bytes, but {entry['size']} were written (truncated or changed)")
        if "tensors" in entry:
            checked_tensors += _verify_shard(target, entry)
        elif _sha256(target, 0, size) != entry["sha256"]:
            raise CheckpointError(f"{target}: its bytes differ from those written (sha256 mismatch: corrupted)")
        checked_bytes += size
    unlisted = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST and p.relative_to(root).as_posix() not in files
    )
    report.summary.update(
        path=str(root),
        files=len(files),
        tensors=checked_tensors,
        bytes=format_size(checked_bytes),
        result="every file, header and tensor matches what was written",
    )
    if unlisted:
        report.notes.append(f"not written by weightsmith (not checked): {', '.join(unlisted)}")
    return report


def _verify_shard(target: Path, entry: dict) -> int:
    with target.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        head += f.read(max(0, min(n, entry["size"])))
    if hashlib.sha256(head).hexdigest() != entry["header_sha256"]:
        raise CheckpointError(f"{target}: its header differs from the one written (corrupted); tensors cannot be found")
    shard = SafetensorsFile(target, target.name)  # the header is the one written: this parses as it did then
    recorded: dict[str, str] = entry["tensors"]
    if set(shard.entries) != set(recorded):
        raise CheckpointError(f"{target}: holds other tensors than those written")
    for name in shard.names():  # storage order: the first corrupted tensor is the first named
        _, offset, count = shard.location(name)
        if _sha256(target, offset, count) != recorded[name]:
            raise CheckpointError(f"{target}: tensor {name!r} is corrupted (its bytes differ from those written)")
    return len(recorded)


def _read_manifest(root: Path) -> dict[str, dict]:
    path = root / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{root}: no {MANIFEST}, so nothing to verify against (not written by weightsmith?)")
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
        for rel, entry in files.items():
            _check_entry(rel, entry)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: malformed manifest ({exc})") from None
    return files


def _check_entry(rel: str, entry: object) -> None:
    parts = PurePosixPath(rel).parts
    if not rel or PurePosixPath(rel).is_absolute() or ".." in parts or "\0" in rel:
        raise ValueError(f"file {rel!r} lies outside the checkpoint")
    if not isinstance(entry, dict) or type(entry.get("size")) is not int:
        raise ValueError(f"entry for {rel!r} has no size")
    digests = [entry.get("sha256")] if "tensors" not in entry else [entry.get("header_sha256")]
    if "tensors" in entry:
        if not isinstance(entry["tensors"], dict):
            raise ValueError(f"entry for {rel!r}: tensors is not an object")
        digests += list(entry["tensors"].values())
    for d in digests:
        if not (isinstance(d, str) and len(d) == 64 and set(d) <= _HEX64):
            raise ValueError(f"entry for {rel!r} has a malformed sha256")


def _sha256(path: Path, offset: int, count: int) -> str:
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        while count:
            chunk = f.read(min(count, 16 * 2**20))
            if not chunk:
                break
            h.update(chunk)
            count -= len(chunk)
    return h.hexdigest()
