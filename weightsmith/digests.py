"""sha256 of input files for provenance: each computed once per process, and startable before torch is imported.

Hashing a multi-GB checkpoint takes about as long as folding or quantizing it, so the CLI calls ``prefetch`` on its
input paths as soon as the arguments are parsed: a helper process (``python -m weightsmith.digests FILE…``, which
prints ``sha256sum``-style lines) hashes them while this interpreter imports torch, free of its GIL and of the
import's own work, and ``file_sha256`` later takes the helper's answer (waiting for it if need be). Any file the
helper could not hash is hashed here instead, so its errors surface where they belong. Imports no torch.

Digests are also kept in ``weightsmith.cache`` under the file's identity (resolved path, size, modification time in
nanoseconds, device, inode), as git's index keeps its stat data: a later run on the same unchanged files (folding
several adapters into one base, trying merge after merge of the same models) reads them back instead of hashing
gigabytes again. A rewritten or replaced file has another identity and is hashed anew.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

FileKey = tuple[str, int, int, int, int]  # a file's identity: resolved path, size, mtime (ns), device, inode
_LOCK = threading.Lock()
_DIGESTS: dict[FileKey, Future] = {}  # file identity (_key) -> sha256 hex, or None: hash here
_CACHE = "sha256"  # weightsmith.cache's folder of digests by file identity
_HASHED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # the weight files a Checkpoint reads


def file_sha256(path: Path) -> str:
    """sha256 of a file (as ``sha256sum`` prints it), remembered per (path, size, mtime) for this process."""
    key = _key(Path(path))
    with _LOCK:
        known = _DIGESTS.get(key)
        mine = known is None
        future: Future = Future() if known is None else known
        _DIGESTS[key] = future
    if mine:
        try:
            future.set_result(_remembered(key) or _remember(key, _sha256(Path(path))))
        except BaseException:
            with _LOCK:
                del _DIGESTS[key]
            future.set_result(None)
            raise
    digest = future.result()
    return digest if digest is not None else file_sha256(path)


def prefetch(paths: Iterable[str | os.PathLike]) -> None:
    """Start hashing the weight files among ``paths`` (files, or the files directly inside directories) in a helper
    process. Anything that is not an existing weight file is ignored; the helper's failures are left to the real
    use."""
    files: dict[FileKey, Path] = {}
    for item in paths:
        path = Path(item)
        try:
            candidates = sorted(path.iterdir()) if path.is_dir() else [path]
            for p in candidates:
                if p.is_file() and p.name.endswith(_HASHED_SUFFIXES):
                    files[_key(p)] = p
        except OSError:
            continue
    with _LOCK:
        pending = {key: _DIGESTS.setdefault(key, Future()) for key in files if key not in _DIGESTS}
    for key in list(pending):
        digest = _remembered(key)
        if digest is not None:
            pending.pop(key).set_result(digest)
    if not pending:
        return
    try:
        helper = subprocess.Popen(
            [sys.executable, "-m", "weightsmith.digests", *(key[0] for key in pending)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    except OSError:
        _settle(pending)
        return
    atexit.register(helper.kill)  # an early exit need not wait for digests nobody will read
    threading.Thread(target=_collect, args=(helper, pending), daemon=True, name="weightsmith-digests").start()


def _collect(helper: subprocess.Popen, pending: dict[FileKey, Future]) -> None:
    by_path = {key[0]: key for key in pending}
    assert helper.stdout is not None  # started with stdout=PIPE
    with helper.stdout:
        for line in helper.stdout:
            digest, _, path = line.rstrip("\n").partition("  ")
            if path in by_path:
                pending[by_path[path]].set_result(digest)
                _remember(by_path[path], digest)
    helper.wait()
    _settle(pending)


def _settle(pending: dict[FileKey, Future]) -> None:
    """Futures the helper did not answer are handed back: the first ``file_sha256`` of them hashes in-process."""
    for key, future in pending.items():
        if not future.done():
            with _LOCK:
                if _DIGESTS.get(key) is future:
                    del _DIGESTS[key]
            future.set_result(None)


def _key(path: Path) -> FileKey:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino


def _unchanged(key: FileKey) -> bool:
    try:
        return _key(Path(key[0])) == key
    except OSError:
        return False


def _remembered(key: FileKey) -> str | None:
    """The digest ``weightsmith.cache`` holds for this exact file identity (a file rewritten since has another)."""
    from weightsmith import cache

    digest = cache.load(_CACHE, json.dumps(list(key)))
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def _remember(key: FileKey, digest: str) -> str:
    """Keep ``digest`` under the file's identity, if the file still has it (nobody rewrote it while it was hashed)."""
    from weightsmith import cache

    if _unchanged(key):
        cache.store(_CACHE, json.dumps(list(key)), digest)
    return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large buffers: digests run beside the work
    return h.hexdigest()


if __name__ == "__main__":  # the helper: one "sha256  path" line per file, as soon as each is done
    for name in sys.argv[1:]:
        try:
            print(f"{_sha256(Path(name))}  {name}", flush=True)
        except OSError:
            continue
