"""The distillation loop on ``accelerate``: the same code runs on one CPU or, under ``accelerate launch``, on several
GPUs or nodes (data parallel). The teacher runs in eval mode without gradients; the student (with any feature
projections) is the only trained module. Training state is saved with ``Accelerator.save_state`` every N steps and
restored with ``load_state``: with the deterministic data order of ``data.Order`` a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith.compress.distill import data as D
from weightsmith.compress.distill import losses as L
from weightsmith.compress.distill.config import DistillConfig
from weightsmith.errors import ConfigError, NumericalError

STATE_FILE = "weightsmith_state.json"


@dataclass
class Plan:
    """Everything the loop needs, resolved and checked by ``distill`` before any work starts."""

    kind: str  # a row of kinds.KINDS
    teacher_dir: Path
    student_dir: Path
    model_class: Any  # the transformers class both models load with
    tokenizer: Any
    train: list[list[int]]
    eval: list[list[int]]
    steps: int
    feature_pairs: list[tuple[int, int]]  # (student layer, teacher layer)
    config: DistillConfig
    state_dir: Path
    resume: bool
    fingerprint: dict


@dataclass
class Result:
    student: nn.Module | None  # the trained student (main process only)
    is_main: bool
    world_size: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)
    overlap: int = 0


@dataclass
class Batch:
    """One batch: the model's keyword inputs and what the loss reads beside the outputs.

    ``mask`` (B, L) marks the positions of the main output that count (real tokens; for masked LM the picked
    positions), ``targets`` the hard labels there, ``attention`` the real positions of the hidden states.
    """

    inputs: dict[str, torch.Tensor]
    attention: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(
            {k: v.to(device) for k, v in self.inputs.items()},
            self.attention.to(device),
            self.targets.to(device),
            self.mask.to(device),
        )


class _Trainee(nn.Module):
    """The student plus the feature projections; its forward returns the loss, so data parallelism syncs all of it."""

    def __init__(self, student: nn.Module, projections: nn.ModuleList, plan: Plan):
        super().__init__()
        self.student, self.projections = student, projections
        self.kind, self.cfg, self.pairs = plan.kind, plan.config, plan.feature_pairs

    def forward(self, batch: Batch, t_logits, t_hidden):
        out = self.student(**batch.inputs, output_hidden_states=True)
        return _loss(self.kind, self.cfg, self.pairs, self.projections, out, batch, t_logits, t_hidden)


def _hidden(kind: str, out) -> tuple:
    """The stack the hidden-state and feature losses read: the decoder's for seq2seq (its encoder's last state is
    appended; speech too), the only one otherwise."""
    if kind in ("seq2seq", "speech"):
        return (*out.decoder_hidden_states, out.encoder_last_hidden_state)
    return out.hidden_states


def _loss(kind, cfg, pairs, projections, out, batch: Batch, t_logits, t_hidden):
    """The objective for one batch: the kind's main loss plus the weighted feature loss. Returns (loss, parts)."""
    attention, hidden = batch.attention, _hidden(kind, out)
    if kind in ("image", "seq2seq", "speech"):
        loss, parts = _head_and_hidden_loss(kind, cfg, out, hidden, batch, t_logits, t_hidden)
    elif kind == "causal":  # position i predicts token i+1
        logits, mask, labels = out.logits[:, :-1], attention[:, 1:], batch.targets[:, 1:]
        teacher = t_logits[:, :-1] if t_logits is not None else None
        loss, parts = L.kd_loss(logits, teacher, labels, mask, temperature=cfg.temperature, alpha=cfg.alpha)
    elif kind == "masked":
        loss, parts = L.kd_loss(
            out.logits, t_logits, batch.targets, batch.mask, temperature=cfg.temperature, alpha=cfg.alpha
        )
    else:
        loss, parts = L.hidden_loss(hidden[-1], t_hidden[-1], attention)
    if pairs:
        if kind == "image":  # every patch of every image counts
            attention = torch.ones(hidden[-1].shape[:2], device=hidden[-1].device)
        feats = L.feature_loss(
            [hidden[s + 1] for s, _ in pairs], [t_hidden[t + 1] for _, t in pairs], list(projections), attention
        )
        loss = loss + cfg.feature_weight * feats
        parts["feature"] = feats.detach()
    return loss, parts


def _head_and_hidden_loss(kind, cfg, out, hidden, batch: Batch, t_logits, t_hidden):
    """Image classification, seq2seq and speech: α·T²·KL + (1−α)·CE on the head's logits (per image, or per target
    token) plus ``hidden_weight`` × MSE of the final hidden states (seq2seq and speech: the decoder's and the
    encoder's, averaged; every encoder position of a speech model counts, its audio features are never padded)."""
    logits, targets, mask = out.logits, batch.targets, batch.mask
    teacher = t_logits
    if kind == "image":  # (B, C) logits: one "position" per image
        logits, targets = logits[:, None], targets[:, None]
        teacher = teacher[:, None] if teacher is not None else None
    loss, parts = L.kd_loss(logits, teacher, targets, mask, temperature=cfg.temperature, alpha=cfg.alpha)
    if cfg.hidden_weight > 0:
        if kind == "image":
            mse = L.hidden_mse(hidden[-1], t_hidden[-1], torch.ones(hidden[-1].shape[:2], device=logits.device))
        else:
            dec = L.hidden_mse(hidden[-2], t_hidden[-2], batch.attention)
            enc_mask = batch.inputs.get("attention_mask")
            if enc_mask is None:  # speech: fixed-length features, no padding
                enc_mask = torch.ones(hidden[-1].shape[:2], device=logits.device)
            enc = L.hidden_mse(hidden[-1], t_hidden[-1], enc_mask)
            mse = (dec + enc) / 2
        loss = loss + cfg.hidden_weight * mse
        parts["hidden"] = mse.detach()
    return loss, parts


def _needs_teacher(plan: Plan) -> bool:
    return plan.kind in ("encoder", "image", "seq2seq", "speech") or plan.config.alpha > 0 or bool(plan.feature_pairs)


def _batch(plan: Plan, examples: list, indices: list[int], mask_seed: int) -> Batch:
    """The batch of the given examples; masked LM corrupts the ids deterministically."""
    if plan.kind == "image":
        pixels = torch.stack([examples[i][0] for i in indices])
        labels = torch.tensor([examples[i][1] for i in indices], dtype=torch.long)
        ones = torch.ones(len(indices), 1, dtype=torch.long)
        return Batch({"pixel_values": pixels}, ones, labels, ones)
    if plan.kind == "speech":
        return _speech_batch(examples, indices)
    tok = plan.tokenizer
    if plan.kind == "seq2seq":
        return _pair_batch(examples, indices, tok.pad_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, attention = D.collate([examples[i] for i in indices], pad)
    if plan.kind != "masked":
        return Batch({"input_ids": ids, "attention_mask": attention}, attention, ids, attention)
    special = torch.isin(ids, torch.tensor(tok.all_special_ids, dtype=torch.long))
    corrupted, picked = D.mask_tokens(
        ids, attention, special, mask_id=tok.mask_token_id, vocab=len(tok), seed=mask_seed
    )
    return Batch({"input_ids": corrupted, "attention_mask": attention}, attention, ids, picked)


def _pair_batch(examples: list, indices: list[int], pad: int) -> Batch:
    """Sources as encoder input, targets teacher-forced through the decoder (``labels``: the model shifts them right
    behind its decoder start token; padded positions are -100, which transformers ignores and never embeds)."""
    ids, attention = D.collate([examples[i][0] for i in indices], pad)
    targets, target_mask = D.collate([examples[i][1] for i in indices], pad)
    labels = targets.masked_fill(target_mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": attention, "labels": labels, "decoder_attention_mask": target_mask}
    return Batch(inputs, target_mask, targets, target_mask)


def _speech_batch(examples: list, indices: list[int]) -> Batch:
    """Audio features (B, mel bins, frames) as encoder input; the decoder reads prompt + transcript[:-1], and the
    positions from the prompt's last token on predict the transcript (the prompt's own positions do not count).
    Right padding is masked by ``decoder_attention_mask`` and never counted."""
    features = torch.stack([examples[i][0] for i in indices])
    decoder, attention = D.collate([examples[i][1] + examples[i][2][:-1] for i in indices], 0)
    targets, mask = torch.zeros_like(decoder), torch.zeros_like(decoder)
    for row, i in enumerate(indices):
        _, prompt, target = examples[i]
        first = len(prompt) - 1  # the position that reads the prompt's last token predicts target[0]
        targets[row, first : first + len(target)] = torch.tensor(target, dtype=torch.long)
        mask[row, first : first + len(target)] = 1
    inputs = {"input_features": features, "decoder_input_ids": decoder, "decoder_attention_mask": attention}
    return Batch(inputs, attention, targets, mask)


def _teacher_out(teacher, plan, batch: Batch, autocast=contextlib.nullcontext):
    """The teacher's logits (None for encoders) and hidden states, as float32 whatever ``autocast`` computed them in."""
    if not _needs_teacher(plan):
        return None, None
    with torch.no_grad(), autocast():
        out = teacher(**batch.inputs, output_hidden_states=True)
    logits = out.logits.float() if plan.kind != "encoder" else None
    return logits, tuple(h.float() for h in _hidden(plan.kind, out))


def _progress(total: int, initial: int, enabled: bool):
    if not enabled or os.environ.get("WEIGHTSMITH_QUIET") or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="distill", unit="step", file=sys.stderr, dynamic_ncols=True)


def _latest_state(state_dir: Path) -> Path | None:
    found = sorted(state_dir.glob("step-*")) if state_dir.is_dir() else []
    return found[-1] if found else None


def check_resume(plan: Plan) -> None:
    """Refuse --resume without a saved state, or with a state saved by a run with different parameters."""
    if not plan.resume:
        return
    latest = _latest_state(plan.state_dir)
    if latest is None:
        raise ConfigError(f"{plan.state_dir}: no saved training state to resume from")
    saved = json.loads((latest / STATE_FILE).read_text())
    if saved["fingerprint"] != plan.fingerprint:
        diff = sorted(
            k
            for k in {**saved["fingerprint"], **plan.fingerprint}
            if saved["fingerprint"].get(k) != plan.fingerprint.get(k)
        )
        raise ConfigError(f"{latest}: saved by a run with different parameters ({', '.join(diff)}); cannot resume")


def _save_state(acc, plan: Plan, step: int) -> None:
    """Save the full training state for ``step`` (steps done) atomically, keeping only the newest."""
    target = plan.state_dir / f"step-{step:08d}"
    tmp = plan.state_dir / f".step-{step:08d}.partial"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "fingerprint": plan.fingerprint}, indent=2))
        tmp.rename(target)
        for old in plan.state_dir.glob("step-*"):
            if old != target:
                shutil.rmtree(old)
    acc.wait_for_everyone()


def _evaluate(acc, trainee: _Trainee, teacher, plan: Plan) -> dict[str, float]:
    """Held-out figures averaged over examples, each rank taking every W-th example (summed across ranks).

    loss: the training objective; ce: the student's next-token (or masked-token) cross-entropy; cosine: the mean
    cosine between student and teacher mean-pooled embeddings (encoders).
    """
    model = acc.unwrap_model(trainee).eval()
    mine = list(range(acc.process_index, len(plan.eval), acc.num_processes))
    sums = torch.zeros(3, dtype=torch.float64)  # loss·n, metric·n, n
    for start in range(0, len(mine), plan.config.batch_size):
        chunk = mine[start : start + plan.config.batch_size]
        batch = _batch(plan, plan.eval, chunk, mask_seed=plan.config.seed + 7919 + start).to(acc.device)
        t_logits, t_hidden = _teacher_out(teacher, plan, batch)
        with torch.no_grad():
            out = model.student(**batch.inputs, output_hidden_states=True)
            loss, _ = _loss(
                plan.kind, plan.config, plan.feature_pairs, model.projections, out, batch, t_logits, t_hidden
            )
            metric = _metric(plan.kind, out, batch, t_logits, t_hidden)
        n = len(chunk)
        sums += torch.tensor([float(loss) * n, float(metric) * n, n], dtype=torch.float64)
    model.train()
    sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
    count = max(float(sums[2]), 1.0)
    return {"loss": float(sums[0]) / count, METRICS[plan.kind]: float(sums[1]) / count}


METRICS = {"causal": "ce", "masked": "ce", "encoder": "cosine", "image": "agreement", "seq2seq": "ce", "speech": "ce"}


def _metric(kind: str, out, batch: Batch, t_logits, t_hidden) -> torch.Tensor:
    """The held-out figure beside the loss (see ``METRICS``): cross-entropy per counted token, embedding cosine,
    or the fraction of images whose top class is the teacher's."""
    if kind == "image":
        return (out.logits.argmax(-1) == t_logits.argmax(-1)).float().mean()
    if kind == "encoder":
        s_pool = L.mean_pool(out.hidden_states[-1].float(), batch.attention)
        t_pool = L.mean_pool(t_hidden[-1].float(), batch.attention)
        return torch.nn.functional.cosine_similarity(s_pool, t_pool, dim=-1).mean()
    if kind == "causal":
        return L.token_ce(out.logits[:, :-1], batch.targets[:, 1:], batch.attention[:, 1:])
    return L.token_ce(out.logits, batch.targets, batch.mask)


def run(plan: Plan) -> Result:
    """Train the student; returns it (on the main process) with the loss curve, evaluations and per-rank data."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    cfg = plan.config
    acc = Accelerator(cpu=cpu_only(), kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    teacher, trainee, optimizer, scheduler = _build(plan, acc)
    trainee, optimizer = acc.prepare(trainee, optimizer)
    acc.register_for_checkpointing(scheduler)
    start = 0
    if plan.resume:
        latest = _latest_state(plan.state_dir)
        assert latest is not None  # checked before the model was built
        acc.load_state(str(latest))
        start = json.loads((latest / STATE_FILE).read_text())["step"]
    result = Result(None, acc.is_main_process, acc.num_processes, start)
    seen, first_batch = _loop(plan, acc, teacher, trainee, optimizer, scheduler, result)
    if plan.eval:
        result.evals.append({"step": plan.steps, **_evaluate(acc, trainee, teacher, plan)})
    _gather_ranks(result, seen, first_batch)
    acc.wait_for_everyone()
    if acc.is_main_process:
        result.student = acc.unwrap_model(trainee).student.eval()
    return result


def _build(plan: Plan, acc):
    """The frozen teacher, the trainee (student + feature projections), AdamW and its warm-up/decay schedule."""
    cfg = plan.config
    teacher = plan.model_class.from_pretrained(plan.teacher_dir, dtype=torch.float32).eval().requires_grad_(False)
    teacher.to(acc.device)
    student = plan.model_class.from_pretrained(plan.student_dir, dtype=torch.float32).train()
    s_width, t_width = _width(student.config), _width(teacher.config)
    if plan.kind == "encoder" and s_width != t_width:
        raise ConfigError(
            f"{plan.student_dir}: hidden width {s_width} differs from the teacher's {t_width}; "
            f"encoder distillation compares hidden states directly"
        )
    projections = nn.ModuleList(
        nn.Linear(s_width, t_width) if s_width != t_width else nn.Identity() for _ in plan.feature_pairs
    )
    table = getattr(student.get_input_embeddings(), "weight", None)  # None: a vision patch projection
    if cfg.freeze_embeddings and table is not None:  # the teacher's token table: unseen tokens stay consistent
        table.requires_grad_(False)
    trainee = _Trainee(student, projections, plan)
    trained = [p for p in trainee.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]  # biases and norms, as BERT/GPT do
    # fused: one kernel over all parameters (on CPU the per-tensor loop costs a third of a small model's step)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        fused=acc.device.type in ("cpu", "cuda"),
    )
    warmup = int(cfg.warmup * plan.steps)
    # linear warm-up, then linear decay to zero; stepped once per optimizer step whatever the process count
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (plan.steps - s) / (plan.steps - warmup)),
    )
    return teacher, trainee, optimizer, scheduler


def _width(config) -> int:
    """The hidden width (``hidden_size``, or T5's ``d_model``)."""
    return int(getattr(config, "hidden_size", None) or config.d_model)


def _loop(plan: Plan, acc, teacher, trainee, optimizer, scheduler, result: Result) -> tuple[set[int], list[int]]:
    """The optimizer steps from ``result.start_step``; returns the examples this rank saw and its first batch."""
    cfg = plan.config
    # bf16 mixed precision: both forwards under torch.autocast, float32 master weights and optimizer state (bf16 keeps
    # float32's exponent range, so no loss scaling); not through accelerate, whose precision is fixed per process
    autocast = functools.partial(
        torch.autocast, acc.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"
    )
    lengths = tuple(_length(e) for e in plan.train) if cfg.group_by_length else None
    order = D.Order(len(plan.train), cfg.batch_size, acc.num_processes, cfg.seed, lengths)
    seen: set[int] = set()
    first_batch: list[int] = []
    bar = _progress(plan.steps, result.start_step, acc.is_main_process)
    for step in range(result.start_step, plan.steps):
        indices = order.batch(step, acc.process_index)
        seen.update(indices)
        first_batch = first_batch or indices
        mask_seed = cfg.seed * 1_000_003 + step * 1009 + acc.process_index
        batch = _batch(plan, plan.train, indices, mask_seed).to(acc.device)
        t_logits, t_hidden = _teacher_out(teacher, plan, batch, autocast)
        with autocast():
            loss, parts = trainee(batch, t_logits, t_hidden)
        if not torch.isfinite(loss):
            raise NumericalError(
                f"{plan.teacher_dir}: the distillation loss became {float(loss)} at step {step + 1} (lower `lr`?)"
            )
        acc.backward(loss)
        acc.clip_grad_norm_(trainee.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))
        if bar is not None:
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            bar.update(1)
        done = step + 1
        if plan.eval and cfg.eval_every and done % cfg.eval_every == 0 and done < plan.steps:
            result.evals.append({"step": done, **_evaluate(acc, trainee, teacher, plan)})
        if cfg.save_every and done % cfg.save_every == 0 and done < plan.steps:
            _save_state(acc, plan, done)
    if bar is not None:
        bar.close()
    return seen, first_batch


def _length(example) -> int:
    """An example's length for grouping: tokens (a pair: source and target; speech: prompt and transcript), 1 for an
    image."""
    if isinstance(example, tuple) and len(example) == 3:
        return len(example[1]) + len(example[2])
    if isinstance(example, tuple):
        return len(example[0]) + len(example[1]) if isinstance(example[1], list) else 1
    return len(example)


def _gather_ranks(result: Result, seen: set[int], first_batch: list[int]) -> None:
    """Per-rank examples seen and first batch, and how many examples more than one rank saw."""
    from accelerate.utils import gather_object

    gathered = gather_object([(result_rank(), sorted(seen), first_batch)])
    counts: dict[int, int] = {}
    for rank, indices, first in sorted(gathered):
        result.ranks.append({"rank": rank, "examples_seen": len(indices), "first_batch": first})
        for i in indices:
            counts[i] = counts.get(i, 0) + 1
    result.overlap = sum(1 for c in counts.values() if c > 1)


def result_rank() -> int:
    return process_state().process_index


def cpu_only() -> bool:
    """True without a GPU or other accelerator: accelerate then trains on CPU, data-parallel over gloo when launched
    with several processes (its multi-CPU mode is only chosen when asked for CPU explicitly)."""
    return not torch.accelerator.is_available()


def process_state():
    """accelerate's process state (a singleton: the first call decides CPU or accelerator for the whole run)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def finish(result: Result) -> None:
    """Let the other processes wait until the main one has written the output."""
    process_state().wait_for_everyone()


def loss_summary(losses: list[float]) -> dict[str, float]:
    """First and last training loss (each a mean over up to 10 steps, to smooth batch noise)."""
    if not losses:
        return {}
    k = min(10, len(losses))
    return {
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "loss_finite": all(math.isfinite(x) for x in losses),
    }


def loss_curve(losses: list[float], start: int, points: int = 20) -> list[dict[str, float]]:
    """The training loss as at most ``points`` (step, mean loss over the window ending there) pairs."""
    width = max(1, -(-len(losses) // points))
    return [
        {
            "step": start + i + len(losses[i : i + width]),
            "loss": sum(losses[i : i + width]) / len(losses[i : i + width]),
        }
        for i in range(0, len(losses), width)
    ]
