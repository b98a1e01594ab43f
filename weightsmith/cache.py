"""An on-disk cache of JSON values that are slow to derive and fixed by what they are derived from.

Its one use today is transformers' facts about a config (``architecture.model_facts``): deriving them imports
transformers and the model's module, seconds of start-up for a verb whose own work on a few hundred megabytes
takes about as long, and the answer is the same every time for one config and one transformers version. The key
names everything the value depends on; the entry stores the key beside the value and is used only when the key
matches, so a hash collision or a truncated file reads as a miss.

Location: ``$WEIGHTSMITH_CACHE``, else ``$XDG_CACHE_HOME/weightsmith``, else ``~/.cache/weightsmith``.
``WEIGHTSMITH_CACHE=off`` turns the cache off. An unreadable, corrupt or unwritable cache is never an error: the
value is derived again. Values are JSON (never pickled objects), written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

OFF = "off"


def directory() -> Path | None:
    """The cache's folder, or None when ``WEIGHTSMITH_CACHE=off``."""
    chosen = os.environ.get("WEIGHTSMITH_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() == OFF else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "weightsmith"


def load(kind: str, key: str) -> Any | None:
    """The value stored under ``key`` in the ``kind`` folder, or None (no entry, cache off, unreadable entry)."""
    path = _entry(kind, key)
    if path is None:
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    return entry.get("value")


def store(kind: str, key: str, value: Any) -> None:
    """Keep ``value`` (JSON-serialisable) under ``key``; silently skipped when the cache cannot be written."""
    path = _entry(kind, key)
    if path is None:
        return
    text = json.dumps({"key": key, "value": value}, sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)  # readers see the old entry or the whole new one, never a part
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return


def _entry(kind: str, key: str) -> Path | None:
    root = directory()
    return None if root is None else root / kind / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
