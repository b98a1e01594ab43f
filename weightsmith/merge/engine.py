"""The merge engine: check the inputs, plan every tensor, then stream: read one tensor from each input, merge, write.

The engine knows no method by name: it calls the method's row of ``table.METHODS``; the methods know nothing
about files. Peak memory per worker is about the largest tensor of every input as stored plus its output (native
methods work block by block from the stored dtype; the others hold (inputs + 2) float32 copies), plus the
writer's buffer. With ``workers > 1`` several tensors are merged at once and written in order; a tensor's random
stream derives from the seed and its name, so the output is byte-identical for any number of workers.

torch's own threads are capped while merging (``stream.compute_threads``): one core is left to the writer's I/O and
hashing threads, and the rest are shared by the workers (on two cores, one torch thread instead of two, medians of
three alternating runs: a TIES merge of three 627 MB models 31.3 → 25.2 s, task arithmetic 8.9 → 7.5 s, SLERP 7.7
→ 7.3 s).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, Checkpoint, CheckpointWriter, TensorSource, provenance_step
from weightsmith.checkpoint.hub import HubHeaders, locate, open_headers
from weightsmith.errors import CheckpointError, ConfigError, NumericalError
from weightsmith.merge.card import model_card
from weightsmith.merge.config import MergeConfig, ModelRef, load_config
from weightsmith.merge.plan import Task, plan
from weightsmith.merge.table import METHODS
from weightsmith.merge.vocab import TOKENIZER_FILES, Vocabulary, vocab_size_of
from weightsmith.merge.vocab import build as build_vocabulary
from weightsmith.numerics import all_finite
from weightsmith.progress import progress
from weightsmith.report import Report, figures_requested
from weightsmith.stream import compute_threads
from weightsmith.units import format_size, parse_dtype

_WORST = 10  # tensors listed in the report for TIES/DARE-like methods


def open_input(spec: str) -> Mapping[str, torch.Tensor]:
    """A checkpoint (a path or a Hub id, ``org/name[@revision]``), or ``base+adapter``: the base with a PEFT LoRA
    adapter folded in lazily (no cache on disk)."""
    if "+" in spec and not Path(spec).exists():
        base, adapter = spec.rsplit("+", 1)
        from weightsmith.merge.lora import open_folded

        return open_folded(locate(base), [(locate(adapter), 1.0)])
    ckpt = Checkpoint(locate(spec))
    if ckpt.is_adapter:
        raise CheckpointError(f"{spec}: a LoRA adapter, not a model; write BASE+{spec} to fold it into a base")
    return ckpt


@dataclass(frozen=True)
class _Copy:
    """A tensor to copy byte for byte from its checkpoint rather than decode."""

    source: TensorSource
    name: str


def provenance_sources(inputs: list[Any]) -> list[TensorSource | str]:
    """What the provenance names for opened inputs: a checkpoint, or both sources of a folded base+adapter."""
    sources: list = []
    for c in inputs:
        sources += [c] if isinstance(c, TensorSource) else list(getattr(c, "inputs", [str(getattr(c, "path", c))]))
    return sources


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for input ``index``'s random stream on tensor ``name``: independent of order and workers."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _merge_tensor(
    config: MergeConfig, task: Task, base: torch.Tensor | None, tensors: list[torch.Tensor], seed: int
) -> tuple[torch.Tensor, Any]:
    """One tensor through its method's row: float32 in and out, except for native methods, which take the stored
    dtype and round once to ``task.dtype`` themselves."""
    row = METHODS[config.method]
    seeds = [tensor_seed(seed, task.name, i) for i in range(len(tensors))] if row.seeded else []
    return row.apply(base, tensors, task.shared, task.per_model, seeds=seeds, out_dtype=task.dtype)


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
    job = _prepare(cfg, report, dtype)
    # read here: the worker threads do not see the caller's context
    figures, figs = figures_requested(), dict[str, Any]()
    work = _tensor_worker(cfg, job, seed, figs if figures else None)
    writer = _writer(cfg, job, out, report, seed, shard_size, force)
    rows: list[dict[str, Any]] = []
    with report.timed("merge"), compute_threads(workers), writer:
        tasks = job.tasks
        for task, (tensor, stats) in zip(
            tasks, _ordered(work, progress(tasks, total=len(tasks), desc="merge"), workers)
        ):
            if isinstance(tensor, _Copy):
                writer.write_from(tensor.source, tensor.name, as_name=task.name)
            else:
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
    _fill_report(report, cfg, len(job.tasks), writer, rows, seed, workers)
    if figures:
        report.figures["tensors"] = [{"name": t.name, **figs[t.name]} for t in job.tasks if t.name in figs]
    return report


@dataclass
class _Job:
    """What a merge reads and writes, decided before any weight is read."""

    refs: list[ModelRef]
    opened: dict[str, Any]
    tasks: list[Task]
    out_config: dict | None
    out_dtype: torch.dtype | None
    in_dtype: torch.dtype | None
    vocabulary: Vocabulary | None


def _prepare(cfg: MergeConfig, report: Report, dtype: str | torch.dtype | None) -> _Job:
    """Open the inputs, plan every output tensor and build the output vocabulary (headers only), then fetch the
    shards of Hub inputs that hold the tensors the plan reads (none before every check has passed)."""
    with report.timed("open"):
        refs: list[ModelRef] = _references(cfg)
        # Hub ids: configs, tokenizers and headers only; the shards come after every check has passed
        opened: dict[str, Any] = {ref.path: open_headers(ref.path) or open_input(ref.path) for ref in refs}
    out_dtype = parse_dtype(dtype or cfg.out_dtype or cfg.dtype)
    with report.timed("plan"):
        tasks, out_config = plan(cfg, opened, out_dtype)
    vocabulary = None
    if cfg.tokenizer is not None:  # an output vocabulary: token-indexed tensors are re-indexed into it
        with report.timed("tokenizer"):
            vocabulary = _vocabulary(cfg, refs, opened)
        out_config = {**(out_config or {}), "vocab_size": vocabulary.size}
    with report.timed("download"):
        opened = _download(opened, tasks)
    return _Job(refs, opened, tasks, out_config, out_dtype, parse_dtype(cfg.dtype), vocabulary)


def _download(opened: dict[str, Any], tasks: list[Task]) -> dict[str, Any]:
    """Each Hub input known from its headers only becomes the checkpoint over the shards holding the tensors the
    tasks read (the others are never downloaded)."""
    read: dict[str, set[str]] = {}
    for task in tasks:
        for path, name in ([task.base] if task.base is not None else []) + list(task.inputs):
            read.setdefault(path, set()).add(name)
    return {p: c.download(read.get(p, ())) if isinstance(c, HubHeaders) else c for p, c in opened.items()}


def _tensor_worker(
    cfg: MergeConfig, job: _Job, seed: int, figs: dict | None
) -> Callable[[Task], tuple[torch.Tensor | _Copy, Any]]:
    """The function that merges one planned tensor (run on the worker threads); ``figs`` collects the HTML
    report's per-tensor figures when one was asked for."""
    row = METHODS[cfg.method]
    native = row.native  # takes the stored dtype and works in fp32 itself: no up-cast copy
    opened, in_dtype, vocabulary = job.opened, job.in_dtype, job.vocabulary

    def work(task: Task) -> tuple[torch.Tensor | _Copy, Any]:
        first = opened[task.primary[0]]
        if not first.info(task.primary[1]).dtype.is_floating_point:  # integer buffers: the primary's, unchanged
            return first[task.primary[1]], None
        vocab = task.vocab and vocabulary is not None
        if not vocab and row.identity is not None and row.identity(task.shared, task.per_model):  # bytes as stored
            source, name = opened[task.inputs[0][0]], task.inputs[0][1]
            stored = source.info(name).dtype
            if isinstance(source, TensorSource) and in_dtype in (None, stored) and task.dtype == stored:
                return _Copy(source, name), None  # file to file, never decoded
            return _load(source, name, in_dtype, True).to(task.dtype), None
        if vocab:  # token rows re-indexed into the output vocabulary (float32)
            assert vocabulary is not None
            base, tensors = _permuted(task, vocabulary, opened, in_dtype)
        else:
            base = _load(opened[task.base[0]], task.base[1], in_dtype, native) if task.base is not None else None
            tensors = [_load(opened[path], name, in_dtype, native) for path, name in task.inputs]
        merged, stats = _merge_tensor(cfg, task, base, tensors, seed)
        if not all_finite(merged):
            raise NumericalError(f"tensor {task.name!r}: the {cfg.method} merge produced NaN or Inf")
        if figs is not None:  # only for an HTML report: one more pass over the tensor
            figs[task.name] = _figures(cfg.method, base, tensors, merged, stats)
        return merged.to(task.dtype), stats

    return work


def _writer(
    cfg: MergeConfig, job: _Job, out: str | os.PathLike, report: Report, seed: int, shard_size: int | str, force: bool
) -> CheckpointWriter:
    """The output's writer, with its provenance, the tokenizer's files carried (or the merged vocabulary's),
    the chat template and the model card."""
    opened = job.opened
    inputs = list(opened.values())
    params = {**cfg.to_dict(), "seed": seed}
    steps = [provenance_step("merge", params, provenance_sources(inputs))]
    tok_ref = cfg.inputs[0] if cfg.tokenizer_source == "first" else job.refs[0]
    carry = list(getattr(opened[tok_ref.path], "carry_files", []))
    if job.vocabulary is not None:  # the merge writes its own tokenizer
        carry = [f for f in carry if not f.name.startswith(TOKENIZER_FILES)]
    writer = CheckpointWriter(
        out,
        steps=steps,
        config=job.out_config,
        carry=carry,
        dtype=job.out_dtype,
        shard_size=shard_size,
        force=force,
    )
    located = {path: str(getattr(ckpt, "path", path)) for path, ckpt in opened.items()}
    for name, content in (job.vocabulary.files() if job.vocabulary is not None else {}).items():
        writer.add_file(name, content)
    if cfg.chat_template is not None:
        writer.carry = _with_chat_template(cfg.chat_template, writer, opened, report)
    writer.add_file("README.md", model_card(cfg, list(opened), located, writer_version(), Path(out).name))
    return writer


def _vocabulary(cfg: MergeConfig, refs: list[ModelRef], opened: Mapping[str, Any]) -> Vocabulary:
    """The output tokenizer and row maps of ``cfg.tokenizer`` over every model the config reads."""
    assert cfg.tokenizer is not None
    models = [r.path for r in refs]
    base = cfg.base.path if cfg.base is not None else models[0]
    dirs = {m: str(getattr(opened[m], "path", m)) for m in models}
    sizes = {m: vocab_size_of(getattr(opened[m], "config", None)) for m in models}
    return build_vocabulary(cfg.tokenizer, base, models, dirs, sizes)


def _permuted(
    task: Task, vocabulary: Any, opened: Mapping[str, Any], in_dtype: torch.dtype | None
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """A token-indexed tensor's base and inputs, re-indexed into the output vocabulary (float32)."""
    pairs = ([task.base] if task.base is not None else []) + list(task.inputs)
    permuted = vocabulary.permute([(path, _load(opened[path], name, in_dtype)) for path, name in pairs])
    base = permuted.pop(0) if task.base is not None else None
    return base, permuted


def _with_chat_template(value: str, writer: CheckpointWriter, opened: Mapping[str, Any], report: Report) -> list:
    """Write the config's chat template as chat_template.jinja beside the output's tokenizer (carried, or written by
    the merge), dropping any template its tokenizer_config.json holds; returns the files still to carry."""
    import json

    from weightsmith.merge.chat import resolve_chat_template

    carried = next((f for f in writer.carry if f.name == "tokenizer_config.json"), None)
    text = writer.files.get("tokenizer_config.json") or (carried.read_bytes() if carried is not None else None)
    if text is None:
        report.notes.append("chat_template: the output has no tokenizer to go with it; not saved (as mergekit)")
        return writer.carry
    template = resolve_chat_template(
        value, [Path(getattr(c, "root", getattr(c, "path", p))) for p, c in opened.items()]
    )
    if template is None:
        return writer.carry
    writer.files.pop("chat_template.json", None)
    writer.add_file("chat_template.jinja", template)
    settings = json.loads(text)
    settings.pop("chat_template", None)
    writer.add_file("tokenizer_config.json", json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    drop = ("tokenizer_config.json", "chat_template.json", "chat_template.jinja")
    return [f for f in writer.carry if f.name not in drop]


def writer_version() -> str:
    from weightsmith import __version__

    return __version__


def _references(cfg: MergeConfig) -> list[ModelRef]:
    """Every model a config reads, once each, the primary (the base, or the first input) first."""
    if cfg.slices:
        refs = [r for sl in cfg.slices for r in sl.sources()]
    else:
        refs = ([cfg.base] if cfg.base else []) + list(cfg.inputs)
    return list({r.path: r for r in refs}.values())


def _figures(
    method: str, base: torch.Tensor | None, tensors: list[torch.Tensor], merged: torch.Tensor, stats
) -> dict[str, float]:
    """The report's per-tensor pictures: change from the base (or the first model), the kept fraction and
    sign-conflict rate of the task-vector family, the angle between the two endpoints of a SLERP."""
    from weightsmith.inspection import change_figures

    row = change_figures(base if base is not None else tensors[0], merged)
    if stats is not None:
        row.update(kept=stats.kept, sign_conflict=stats.conflict)
    ends = (base, tensors[0]) if method == "slerp" else (tensors[0], tensors[1]) if method == "nuslerp" else None
    if ends is not None and ends[0] is not None:
        cos = change_figures(ends[0], ends[1])["cosine"]
        row["angle"] = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
    return row


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
