"""Progress bars on stderr; silent when stderr is not a terminal (pipelines, CI) or when asked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "tensor") -> Iterator[T]:
    if os.environ.get("WEIGHTSMITH_QUIET") or not sys.stderr.isatty():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
