"""Model merging, mergekit-compatible and streamed: ``run(config, out)`` for a mergekit YAML, ``quick(...)`` for a
one-line merge. The math lives in ``methods`` (pure functions), the YAML in ``config``, the streaming in ``engine``.

    import weightsmith as ws
    ws.merge.run("ties.yaml", "merged/")
    ws.merge.quick("ties", ["ft-a", ("ft-b", 0.5)], "merged/", base="base", density=0.5)

Importing this package stays light (no torch) so that sibling modules and the CLI can import it freely.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weightsmith.report import Report


def run(
    config: str | os.PathLike | Mapping,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    workers: int = 1,
    dtype: str | None = None,
    shard_size: int | str = 5 * 10**9,
    force: bool = False,
) -> Report:
    """Merge as a mergekit-style config (YAML file, YAML text or dict) says; see ``engine.run``. A YAML file of
    several documents is a multi-stage merge (mergekit-multi's format; see ``stages``), run as one job. A config
    with ``experts`` is a mixture-of-experts merge (mergekit-moe's format; see ``moe``); ``workers`` does not apply."""
    from weightsmith.merge.moe import is_moe_config
    from weightsmith.merge.stages import run_stages, stages_in

    options: dict[str, Any] = dict(seed=seed, workers=workers, dtype=dtype, shard_size=shard_size, force=force)
    stages = stages_in(config)
    if stages is not None:
        return run_stages(stages, out, **options)
    if is_moe_config(config):
        from weightsmith.merge.moe_engine import run as _moe

        return _moe(config, out, seed=seed, dtype=dtype, shard_size=shard_size, force=force)
    from weightsmith.merge.engine import run as _run

    return _run(config, out, **options)


def quick(
    method: str,
    models: Sequence[str | tuple[str, float]],
    out: str | os.PathLike,
    *,
    base: str | None = None,
    seed: int = 0,
    workers: int = 1,
    dtype: str | None = None,
    shard_size: int | str = 5 * 10**9,
    force: bool = False,
    **parameters: Any,
) -> Report:
    """The short form: ``models`` are paths or (path, weight) pairs; other keyword arguments become the config's
    top-level ``parameters`` (``lam`` is accepted for mergekit's ``lambda``). Weights default to 1.

    >>> ws.merge.quick("ties", [("a", 0.6), ("c", 0.4)], "out", base="b", density=0.5)  # doctest: +SKIP
    """
    entries = []
    for m in models:
        path, weight = (m, None) if isinstance(m, str) else m
        entries.append({"model": str(path), "parameters": {"weight": float(weight)} if weight is not None else {}})
    params = {("lambda" if k == "lam" else k): v for k, v in parameters.items() if v is not None}
    from weightsmith.merge.table import METHODS

    row = METHODS.get(method)
    if row is not None and "weight" in row.per_model:
        params.setdefault("weight", 1.0)  # top-level: models without their own weight (the base too) get 1
    config = {"merge_method": method, "models": entries, "parameters": params}
    if base is not None:
        config["base_model"] = str(base)
    return run(config, out, seed=seed, workers=workers, dtype=dtype, shard_size=shard_size, force=force)
