"""The merge engine: check the inputs, plan every tensor, then stream: read one tensor from each input, merge, write.

The engine knows nothing about any method's math (``methods``) and the methods know nothing about files. Peak
memory per worker is about the largest tensor of every input as stored plus its output (the task-vector family,
linear and slerp work block by block from the stored dtype; nuslerp and model_stock hold (inputs + 2) float32
copies), plus the writer's buffer. With ``workers > 1`` several tensors are merged at once and written in order; a
tensor's random stream derives from the seed and its name, so the output is byte-identical for any number of
workers.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith import architecture
from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, CheckpointWriter, provenance_step
from weightsmith.errors import CheckpointError, ConfigError, IncompatibleError, NumericalError
from weightsmith.merge import methods as M
from weightsmith.merge.config import MergeConfig, ModelRef, gradient_position, load_config, resolve
from weightsmith.progress import progress
from weightsmith.report import Report
from weightsmith.units import format_size, parse_dtype

_WORST = 10  # tensors listed in the report for TIES/DARE-like methods


def open_input(spec: str) -> Mapping[str, torch.Tensor]:
    """A checkpoint, or ``base+adapter``: the base with a PEFT LoRA adapter folded in lazily (no cache on disk)."""
    if "+" in spec and not Path(spec).exists():
        base, adapter = spec.rsplit("+", 1)
        from weightsmith.merge.lora import open_folded

        return open_folded(base, [(adapter, 1.0)])
    ckpt = Checkpoint(spec)
    if ckpt.is_adapter:
        raise CheckpointError(f"{spec}: a LoRA adapter, not a model; write BASE+{spec} to fold it into a base")
    return ckpt


@dataclass(frozen=True)
class _Task:
    """Everything needed to merge one tensor, fixed before anything is written."""

    name: str
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]
    dtype: torch.dtype  # output dtype of this tensor


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for input ``index``'s random stream on tensor ``name``: independent of order and workers."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _check_compatible(labels: Sequence[str], inputs: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """The tensor names of the first input, after checking every input holds the same names and shapes."""
    first = inputs[0]
    problems = []
    names = list(first)
    for label, ckpt in zip(labels[1:], inputs[1:]):
        missing = [n for n in names if n not in ckpt]
        extra = [n for n in ckpt if n not in first]
        if missing:
            problems.append(f"{label} lacks {len(missing)} tensor(s) of {labels[0]}, e.g. {missing[0]!r}")
        if extra:
            problems.append(f"{label} has {len(extra)} tensor(s) {labels[0]} lacks, e.g. {extra[0]!r}")
        for n in names:
            if n in ckpt and ckpt.info(n).shape != first.info(n).shape:
                problems.append(
                    f"{n!r} is {list(ckpt.info(n).shape)} in {label} but {list(first.info(n).shape)} in {labels[0]}"
                )
        vocab_a = (getattr(first, "config", None) or {}).get("vocab_size")
        vocab_b = (getattr(ckpt, "config", None) or {}).get("vocab_size")
        if vocab_a is not None and vocab_b is not None and vocab_a != vocab_b:
            problems.append(f"vocab_size {vocab_b} in {label} but {vocab_a} in {labels[0]}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise IncompatibleError(f"inputs do not match: {shown}")
    return names


def _check_task(config: MergeConfig, task: _Task) -> None:
    """Parameter values that cannot work, named with their tensor (checked for every tensor before writing)."""
    where = f"tensor {task.name!r}"
    for ref, p in zip(config.inputs, task.per_model):
        d = p.get("density")
        if d is not None and not 0 <= d <= 1:
            raise ConfigError(f"{where}: density {d} of model {ref.path} is outside [0, 1]")
        eps = p.get("epsilon")
        if eps is not None and d is not None and d < 1 and not (0 < d - eps and d + eps < 1):
            raise ConfigError(f"{where}: model {ref.path}: density ± epsilon ({d} ± {eps}) must lie inside (0, 1)")
        g = p.get("gamma")
        if g is not None and not 0 <= g <= 1:
            raise ConfigError(f"{where}: gamma {g} of model {ref.path} is outside [0, 1]")
    if config.method == "linear" and task.shared["normalize"]:
        total = sum(p["weight"] for p in task.per_model)
        if abs(total) < 1e-12:
            weights = ", ".join(f"{p['weight']:g}" for p in task.per_model)
            raise ConfigError(f"{where}: the linear weights sum to 0 and normalize is on (weights: {weights})")


def _merge_tensor(
    config: MergeConfig, task: _Task, base: torch.Tensor | None, tensors: list[torch.Tensor], seed: int
) -> tuple[torch.Tensor, M.FamilyStats | None]:
    """Dispatch one tensor to its method: float32 in and out, except linear, slerp and the task-vector family, which
    take the stored dtype and round once to ``task.dtype`` themselves."""
    method, s, pm = config.method, task.shared, task.per_model
    if method == "linear":
        return M.linear(tensors, [p["weight"] for p in pm], normalize=s["normalize"], out_dtype=task.dtype), None
    if method == "slerp":
        return M.slerp(base, tensors[0], s["t"], out_dtype=task.dtype), None
    if method == "nuslerp":
        return M.nuslerp(
            tensors[0],
            tensors[1],
            [p["weight"] for p in pm],
            base=base,
            row_wise=s["nuslerp_row_wise"],
            flatten=s["nuslerp_flatten"],
        ), None
    if method == "model_stock":
        return M.model_stock(base, tensors, filter_wise=s["filter_wise"]), None
    if method == "passthrough":
        return M.passthrough(tensors[0], pm[0]["scale"]), None
    return M.merge_task_vectors(
        M.FAMILY[method],
        base,
        tensors,
        [p["weight"] for p in pm],
        densities=[p["density"] for p in pm],
        lam=s["lambda"],
        normalize=s["normalize"],
        rescale=s["rescale"],
        rescale_mode=s.get("rescale_mode", "1/p"),
        consensus=s.get("consensus"),
        gammas=[p.get("gamma", 0.01) for p in pm],
        epsilons=[p.get("epsilon", 0.15) for p in pm],
        seeds=[tensor_seed(seed, task.name, i) for i in range(len(tensors))],
        out_dtype=task.dtype,
    )


def run(
    config: str | os.PathLike | Mapping | MergeConfig,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    workers: int = 1,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
) -> Report:
    """Merge the models a mergekit-style config names into ``out`` (written atomically); returns the report.

    ``config`` is a YAML file, YAML text, a dict or a ``MergeConfig``. ``dtype`` overrides the config's
    ``out_dtype``/``dtype``. Random methods (DARE, DELLA) draw from ``seed`` and each tensor's name.

    >>> ws.merge.run("ties.yaml", "merged/", workers=2)  # doctest: +SKIP
    """
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    report = Report("merge", output=str(out))
    with report.timed("open"):
        refs: list[ModelRef] = ([cfg.base] if cfg.base else []) + list(cfg.inputs)
        opened = {ref.path: open_input(ref.path) for ref in refs}
        inputs = [opened[r.path] for r in refs]
        names = _check_compatible([r.path for r in refs], inputs)
    primary = inputs[0]  # the base, or the first input
    tok_ref = refs[0]
    if cfg.tokenizer_source == "first":
        tok_ref = cfg.inputs[0]
    elif cfg.tokenizer_source not in (None, "base"):
        tok_ref = next(r for r in refs if os.path.normpath(r.path) == os.path.normpath(cfg.tokenizer_source))
    out_dtype = parse_dtype(dtype or cfg.out_dtype or cfg.dtype)
    in_dtype = parse_dtype(cfg.dtype)
    num_layers = architecture.num_layers(getattr(primary, "config", None), names)

    tasks: list[_Task] = []
    with report.timed("plan"):
        for name in names:
            info = primary.info(name)
            target = out_dtype if out_dtype is not None and info.dtype.is_floating_point else info.dtype
            shared, per_model = resolve(cfg, name, gradient_position(name, num_layers))
            task = _Task(name, shared, per_model, target)
            _check_task(cfg, task)
            tasks.append(task)

    base_ckpt = opened[cfg.base.path] if cfg.base else None
    model_ckpts = [opened[r.path] for r in cfg.inputs]

    # linear, slerp and the task-vector family take the stored dtype and work in fp32 themselves: no up-cast copy
    native = cfg.method in ("linear", "slerp") or cfg.method in M.FAMILY

    def work(task: _Task) -> tuple[torch.Tensor, M.FamilyStats | None]:
        info = primary.info(task.name)
        if not info.dtype.is_floating_point:  # integer buffers (position ids…): the primary input's, unchanged
            return primary[task.name], None
        base = _load(base_ckpt, task.name, in_dtype, native) if base_ckpt is not None else None
        tensors = [_load(c, task.name, in_dtype, native) for c in model_ckpts]
        merged, stats = _merge_tensor(cfg, task, base, tensors, seed)
        # element-wise, never a sum in the output dtype: an fp16 sum of finite values overflows at 65504
        if not bool(torch.isfinite(merged).all()):
            raise NumericalError(f"tensor {task.name!r}: the {cfg.method} merge produced NaN or Inf")
        return merged.to(task.dtype), stats

    params = {**cfg.to_dict(), "seed": seed}
    sources: list = []
    for c in inputs:  # a folded base+adapter names both of its sources
        sources += [c] if isinstance(c, Checkpoint) else list(getattr(c, "inputs", [str(getattr(c, "path", c))]))
    steps = [provenance_step("merge", params, sources)]
    tok_src = opened[tok_ref.path]
    writer = CheckpointWriter(
        out,
        steps=steps,
        config=getattr(primary, "config", None),
        carry=getattr(tok_src, "carry_files", []),
        dtype=out_dtype,
        shard_size=shard_size,
        force=force,
    )
    rows: list[dict[str, Any]] = []
    with report.timed("merge"), writer:
        for task, (tensor, stats) in zip(
            tasks, _ordered(work, progress(tasks, total=len(tasks), desc="merge"), workers)
        ):
            writer.write(task.name, tensor)
            if stats is not None:
                rows.append(
                    {
                        "tensor": task.name,
                        "numel": tensor.numel(),
                        "kept": round(stats.kept, 4),
                        "sign_conflict": round(stats.conflict, 4),
                    }
                )
    _fill_report(report, cfg, len(tasks), writer, rows, seed, workers)
    return report


def _load(
    ckpt: Mapping[str, torch.Tensor], name: str, in_dtype: torch.dtype | None, native: bool = False
) -> torch.Tensor:
    t = ckpt[name]
    if in_dtype is not None and t.dtype != in_dtype:
        t = t.to(in_dtype)  # mergekit's `dtype`: inputs are rounded to it before merging
    return t if native else t.float()  # fp32 accumulation whatever the storage dtype


def _ordered(fn, items, workers: int):
    """fn over items, results in input order; with workers > 1 up to ``workers`` results in flight."""
    if workers == 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: deque = deque()
        try:
            for item in items:
                window.append(pool.submit(fn, item))
                if len(window) >= workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()


def _fill_report(
    report: Report,
    cfg: MergeConfig,
    count: int,
    writer: CheckpointWriter,
    rows: list[dict[str, Any]],
    seed: int,
    workers: int,
) -> None:
    report.summary.update(
        method=cfg.method,
        base=cfg.base.path if cfg.base else None,
        models=[r.path for r in cfg.inputs],
        tensors=count,
        bytes_out=format_size(writer.total_size),
        shards=writer.num_shards,
        seed=seed,
        workers=workers,
    )
    report.details["parameters"] = {
        "top-level": dict(cfg.parameters),
        **{r.path: dict(r.parameters) for r in cfg.inputs if r.parameters},
    }
    if rows:
        total = sum(r["numel"] for r in rows)
        report.summary["kept_fraction"] = round(sum(r["kept"] * r["numel"] for r in rows) / total, 4)
        report.summary["sign_conflict_rate"] = round(sum(r["sign_conflict"] * r["numel"] for r in rows) / total, 4)
        report.tensors = sorted(rows, key=lambda r: -r["sign_conflict"])[:_WORST]
        report.notes.append(f"tensors: the {min(_WORST, len(rows))} with the highest sign-conflict rate")
