"""``export safetensors``: ``convert`` plus removal of what is not part of the model.

Training checkpoints carry tensors no loader wants: optimizer state (Adam's ``exp_avg``/``exp_avg_sq``, SGD's
``momentum_buffer``, whole ``optimizer.``/``lr_scheduler.`` sub-dicts flattened into the file) and the
reparametrisation left by ``torch.nn.utils.prune`` (``<p>_orig`` and ``<p>_mask`` in place of ``<p>``). Each one
is named in the report; nothing is dropped silently.
"""

from __future__ import annotations

import os
import re

import torch

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, TensorSource
from weightsmith.conversion import as_checkpoint, copy_through
from weightsmith.errors import ConfigError, IncompatibleError
from weightsmith.report import Report

# A flattened optimizer / scheduler / AMP-scaler sub-dict, or a per-parameter optimizer buffer.
_TRAINING_STATE = re.compile(
    r"^(optimizer|optimizer_state|optim|lr_scheduler|scheduler|scaler|grad_scaler)\.|"
    r"(^|\.)(exp_avg|exp_avg_sq|max_exp_avg_sq|momentum_buffer)$"
)
_SINGLE_FILE = 2**62  # a shard size no checkpoint reaches


def prune_fold(orig: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """p = p_orig ⊙ p_mask — what ``torch.nn.utils.prune.remove`` makes permanent; kept in ``p_orig``'s dtype."""
    return (orig.float() * mask.float()).to(orig.dtype)


def plan_model_tensors(ckpt: TensorSource) -> tuple[dict, list[dict]]:
    """The output tensors of ``ckpt`` (name → producer, storage order) and one row per tensor dropped or folded.

    ``<p>_orig`` + ``<p>_mask`` become ``<p>`` = orig ⊙ mask; if ``<p>`` is stored as well they are leftovers and
    dropped. A lone ``_orig`` or ``_mask`` is kept: without its pair it may be a real tensor.
    """
    names = list(ckpt)
    present = set(names)
    plan: dict = {}
    rows: list[dict] = []
    for name in names:
        if _TRAINING_STATE.search(name):
            rows.append({"tensor": name, "action": "dropped", "reason": "optimizer/scheduler state"})
            continue
        base = _pruned_base(name, present)
        if base is None:
            plan[name] = None  # unchanged
            continue
        if base in present:
            rows.append({"tensor": name, "action": "dropped", "reason": f"pruning leftover ({base} is stored)"})
            continue
        rows.append({"tensor": name, "action": "folded", "reason": f"into {base} = {base}_orig ⊙ {base}_mask"})
        if name.endswith("_orig"):
            orig, mask = ckpt.info(name), ckpt.info(base + "_mask")
            if orig.shape != mask.shape:
                raise IncompatibleError(
                    f"{ckpt.path}: pruning mask {mask.name!r} has shape {list(mask.shape)}, "
                    f"{orig.name!r} has {list(orig.shape)}"
                )
            plan[base] = lambda b=base: prune_fold(ckpt[b + "_orig"], ckpt[b + "_mask"])
    return plan, rows


def _pruned_base(name: str, present: set[str]) -> str | None:
    for suffix, other in (("_orig", "_mask"), ("_mask", "_orig")):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if base + other in present:
                return base
    return None


def safetensors(
    src: TensorSource | str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    single_file: bool = False,
    force: bool = False,
) -> Report:
    """Write the model tensors of ``src`` as a clean safetensors directory (``convert`` + training leftovers removed).

    Dropped: optimizer/scheduler state and pruning leftovers whose parameter is stored; folded: ``<p>_orig`` ⊙
    ``<p>_mask`` into ``<p>`` (as ``torch.nn.utils.prune.remove``). Every such tensor is a row of the report.
    ``single_file`` writes one ``model.safetensors`` whatever the size (``shard_size`` is then ignored).

    >>> ws.export.safetensors("run/checkpoint-500", "clean/", dtype="bf16")  # doctest: +SKIP
    """
    ckpt = as_checkpoint(src)
    if ckpt.is_adapter:
        raise ConfigError(f"{ckpt.path}: a PEFT adapter; export safetensors takes a model (fold it with lora merge)")
    plan, rows = plan_model_tensors(ckpt)
    if not plan:
        raise ConfigError(f"{ckpt.path}: no model tensors left after dropping {len(rows)} training-state tensor(s)")
    report = copy_through(
        ckpt,
        out,
        operation="export safetensors",
        plan=plan,
        params={"single_file": single_file},
        dtype=dtype,
        shard_size=_SINGLE_FILE if single_file else shard_size,
        force=force,
    )
    report.summary.update(
        dropped=sum(r["action"] == "dropped" for r in rows), folded=sum(r["action"] == "folded" for r in rows) // 2
    )
    report.tensors = rows
    return report
