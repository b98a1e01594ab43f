"""Knowledge distillation: train a smaller student to imitate a teacher checkpoint, on ``accelerate``.

    ws.distill("teacher", "student_out", "corpus.txt", layers=[0, 2, 4], steps=500)

The student is either a checkpoint (``student=``, e.g. a structurally pruned model) or built from the teacher's own
layers (``layers=`` / ``keep_every=``). The loss follows the model kind: KD + CE for causal and masked LMs, hidden
state MSE + cosine for encoders without a head (see ``losses``). The output is a plain transformers directory with the
tokenizer, written atomically; under ``accelerate launch`` the same call trains data-parallel on several processes.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from weightsmith.checkpoint import Checkpoint, CheckpointWriter, check_destination, provenance_step
from weightsmith.compress.distill import data as D
from weightsmith.compress.distill import student as S
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import CheckpointError, ConfigError, IncompatibleError
from weightsmith.report import Report
from weightsmith.units import parse_dtype

__all__ = ["DistillConfig", "distill"]


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Training hyper-parameters (the training state saved for ``resume`` records them; a resume must match)."""

    temperature: float = 2.0  # DistilBERT's T: soft enough to carry the teacher's ranking of wrong answers
    alpha: float = 0.5  # weight of the soft KD term; 1 − α goes to the hard CE term
    lr: float = 1e-4  # AdamW; layer-dropped students start close to the teacher, so a fine-tuning rate
    steps: int | None = None  # optimizer steps; default one epoch (see ``epochs``)
    epochs: float | None = None  # passes over the training text, when ``steps`` is not given
    batch_size: int = 8  # per process: the global batch is batch_size × processes, as accelerate counts it
    seq_len: int = 128  # tokens per example (truncation for encoders, packing block for causal LMs)
    seed: int = 0  # data order, masking and any fresh projection weights
    feature_layers: tuple[int, ...] = ()  # student layers whose outputs also match the teacher's (FitNets)
    feature_weight: float = 1.0
    eval_every: int | None = None  # steps between held-out evaluations (always one at the end)
    save_every: int | None = None  # steps between saved training states (for resume)
    warmup: float = 0.05  # fraction of steps with a linearly rising learning rate
    weight_decay: float = 0.01  # on matrices only, as BERT and GPT training do
    max_grad_norm: float = 1.0
    group_by_length: bool = True  # batches of similar-length examples: less padding, same examples per epoch
    freeze_embeddings: bool = False  # keep the input token table (and a head tied to it) as the teacher's
    mixed_precision: str = "no"  # "bf16": training forwards under autocast; weights, optimizer, evaluation in fp32

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature {self.temperature}: must be positive")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha {self.alpha}: must lie in [0, 1]")
        if self.lr <= 0:
            raise ConfigError(f"lr {self.lr}: must be positive")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either steps or epochs, not both")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"steps {self.steps}: must be at least 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs {self.epochs}: must be positive")
        for name in ("batch_size", "seq_len", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} {value}: must be at least 1")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len {self.seq_len}: must be at least 2")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup {self.warmup}: must lie in [0, 1)")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision {self.mixed_precision!r}: expected no or bf16")
        if any(i < 0 for i in self.feature_layers):
            raise ConfigError(f"feature_layers {list(self.feature_layers)}: indices must be non-negative")


def _kind(arch: str) -> str:
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if arch.endswith("ForMaskedLM"):
        return "masked"
    return "encoder"


def _model_class(ckpt: Checkpoint) -> tuple[str, Any]:
    archs = (ckpt.config or {}).get("architectures") or []
    if not archs:
        raise CheckpointError(f"{ckpt.path}: config.json names no architecture; distillation needs a model class")
    import transformers

    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise CheckpointError(f"{ckpt.path}: architecture {archs[0]!r} is not in this transformers version")
    return archs[0], cls


def _embedding_rows(ckpt: Checkpoint) -> int | None:
    for name in ckpt:
        if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")):
            return ckpt.info(name).shape[0]
    return None


def _check_student(teacher: Checkpoint, student: Checkpoint, t_arch: str) -> None:
    """Refuse a student that cannot learn from this teacher: another vocabulary, another kind of model."""
    if student.config is None:
        raise CheckpointError(f"{student.path}: no config.json; the student must be a transformers model directory")
    assert teacher.config is not None  # its architecture was read from it
    t_vocab, s_vocab = teacher.config.get("vocab_size"), student.config.get("vocab_size")
    t_rows, s_rows = _embedding_rows(teacher), _embedding_rows(student)
    if t_vocab != s_vocab or t_rows != s_rows:
        raise IncompatibleError(
            f"{student.path}: vocabulary of {s_vocab} tokens (embedding rows {s_rows}) differs "
            f"from the teacher's {t_vocab} (rows {t_rows}); distillation needs the same tokenizer"
        )
    s_arch = (student.config.get("architectures") or [""])[0]
    if _kind(s_arch) != _kind(t_arch):
        raise IncompatibleError(
            f"{student.path}: a {s_arch or 'model without architecture'} cannot be distilled "
            f"from a {t_arch} (different outputs)"
        )


def _load_tokenizer(path: Path, kind: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path}: no usable tokenizer ({str(exc).splitlines()[0][:160]}); pass `tokenizer`"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # causal LMs often ship without a pad token; padded positions are masked out
    if kind == "masked" and tok.mask_token_id is None:
        raise CheckpointError(f"{path}: the tokenizer has no mask token, which masked-LM distillation needs")
    return tok


def distill(
    teacher: Checkpoint | str | os.PathLike,
    out: str | os.PathLike,
    data: str | os.PathLike,
    *,
    student: str | os.PathLike | None = None,
    layers: list[int] | None = None,
    keep_every: int | None = None,
    eval_data: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    lr: float = 1e-4,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    feature_layers: list[int] | None = None,
    feature_weight: float = 1.0,
    eval_every: int | None = None,
    save_every: int | None = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    dtype: str | None = None,
    group_by_length: bool = True,
    freeze_embeddings: bool = False,
    mixed_precision: str = "no",
    force: bool = False,
) -> Report:
    """Distil ``teacher`` into a student trained on the text in ``data`` and write it to ``out``.

    Loss by kind: causal LM  α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, next token) (Hinton et al. 2015);
    masked LM  the same on the BERT-masked positions (DistilBERT, Sanh et al. 2019, without its extra hidden-state
    cosine term unless ``feature_layers`` asks for it); encoders without a head  MSE + (1 − cos) on per-token and
    mean-pooled final hidden states. ``feature_layers`` adds FitNets' MSE between chosen student layers and their
    teacher counterparts, through a learned projection if widths differ: for a student built from kept layers
    k₀ < k₁ < …, student layer i matches teacher layer kᵢ₊₁ − 1 (whose output the copy of kᵢ₊₁ was trained to read;
    the last matches the teacher's last), for any other student the proportional layer (TinyBERT's uniform mapping).
    With all layers listed this is TinyBERT's hidden-state loss on every student layer.

    Throughput: ``group_by_length`` (default on) fills each batch with examples of similar length (transformers'
    length-grouped sampler; every example is still seen once per epoch), ``freeze_embeddings`` keeps the input token
    table at the teacher's (fewer trained parameters; tokens absent from the training text stay consistent with the
    rest), ``mixed_precision="bf16"`` runs both forwards under bf16 autocast (about twice as fast on CPUs with bf16
    instructions, slower on those without) while weights, optimizer state and the reported evaluation stay float32.

    Training state is saved under ``state_dir`` (default ``OUT.distill-state``) every ``save_every`` steps;
    ``resume=True`` continues from the newest state exactly (same data order, optimizer, scheduler and RNG).

    >>> ws.distill("minilm", "minilm-3l", "corpus.txt", layers=[0, 2, 4], steps=300)  # doctest: +SKIP
    """
    cfg = DistillConfig(
        temperature=temperature,
        alpha=alpha,
        lr=lr,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        feature_layers=tuple(feature_layers or ()),
        feature_weight=feature_weight,
        eval_every=eval_every,
        save_every=save_every,
        group_by_length=group_by_length,
        freeze_embeddings=freeze_embeddings,
        mixed_precision=mixed_precision,
    )
    out = Path(out)
    target_dtype = parse_dtype(dtype)
    report = Report("distill", output=str(out))
    with report.timed("prepare"):
        t_ckpt = as_checkpoint(teacher)
        if t_ckpt.config is None:
            raise CheckpointError(f"{t_ckpt.path}: no config.json; the teacher must be a transformers model directory")
        check_destination(out, force)
        texts = D.read_texts(data)
        eval_texts = D.read_texts(eval_data) if eval_data is not None else []
        t_arch, model_class = _model_class(t_ckpt)
        kind = _kind(t_arch)
        t_layers = S.layer_count(t_ckpt.config, t_ckpt.path)
        if student is not None:
            if layers is not None or keep_every is not None:
                raise ConfigError("give either a student checkpoint or layers/keep_every, not both")
            s_ckpt = as_checkpoint(student)
            _check_student(t_ckpt, s_ckpt, t_arch)
            kept = None
            s_layers = S.layer_count(s_ckpt.config, s_ckpt.path)
        else:
            if layers is None and keep_every is None:
                raise ConfigError("no student: give a student checkpoint, or layers / keep_every to build one")
            kept = S.resolve_layers(t_layers, layers, keep_every, t_ckpt.path)
            s_ckpt, s_layers = None, len(kept)
        bad = [i for i in cfg.feature_layers if i >= s_layers]
        if bad:
            raise ConfigError(f"feature_layers {bad}: out of range, the student has layers 0..{s_layers - 1}")
        pairs = [(i, S.teacher_counterpart(i, kept, t_layers, s_layers)) for i in cfg.feature_layers]
        tok_dir = Path(tokenizer) if tokenizer is not None else t_ckpt.path
        tok = _load_tokenizer(tok_dir, kind)
        train_examples = D.tokenize(texts, tok, causal=kind == "causal", seq_len=cfg.seq_len)
        eval_examples = D.tokenize(eval_texts, tok, causal=kind == "causal", seq_len=cfg.seq_len)
        if not train_examples:
            raise ConfigError(f"{data}: no training example survives tokenisation (text too short?)")
        world = _world_size()
        total_steps = cfg.steps or D.Order(len(train_examples), cfg.batch_size, world, cfg.seed).steps_for_epochs(
            cfg.epochs or 1.0
        )
        if total_steps < 1:
            raise ConfigError(
                f"{data}: {len(train_examples)} examples give zero steps at a global batch of "
                f"{cfg.batch_size * world}; give `steps` or more `epochs`"
            )
        state = Path(state_dir) if state_dir is not None else out.parent / f"{out.name}.distill-state"
        fingerprint = {
            "teacher": str(t_ckpt.path.resolve()),
            "student": str(Path(student).resolve()) if student else None,
            "layers": kept,
            "data": str(Path(data).resolve()),
            "tokenizer": str(tok_dir.resolve()),
            "steps": total_steps,
            "processes": world,
            **asdict(cfg),
        }
        fingerprint = json.loads(json.dumps(fingerprint))  # tuples → lists, as the saved copy reads back

    from weightsmith.compress.distill import train as T

    with tempfile.TemporaryDirectory(prefix="weightsmith-student-") as tmp:
        if kept is not None:
            with report.timed("init_student"):
                s_dir = S.write_student(t_ckpt, Path(tmp) / "student", kept)
        else:
            assert s_ckpt is not None  # a student is given when no layers are kept from the teacher
            s_dir = s_ckpt.path
        plan = T.Plan(
            kind=kind,
            teacher_dir=t_ckpt.path,
            student_dir=s_dir,
            model_class=model_class,
            tokenizer=tok,
            train=train_examples,
            eval=eval_examples,
            steps=total_steps,
            feature_pairs=pairs,
            config=cfg,
            state_dir=state,
            resume=resume,
            fingerprint=fingerprint,
        )
        T.check_resume(plan)
        with report.timed("train"):
            result = T.run(plan)
        source = Checkpoint(s_dir)
        if result.is_main:
            with report.timed("write"):
                _write(
                    result.student,
                    tok,
                    source,
                    t_ckpt,
                    out,
                    target_dtype or _float_dtype(source),
                    force,
                    {"layers": kept, "data": str(data), "steps": total_steps, **asdict(cfg)},
                    student,
                )
        T.finish(result)

    report.summary.update(
        kind=kind,
        teacher=str(t_ckpt.path),
        teacher_layers=t_layers,
        student=str(student) if student else f"teacher layers {kept}",
        student_layers=s_layers,
        steps=total_steps,
        resumed_from=result.start_step or None,
        processes=result.world_size,
        train_examples=len(train_examples),
        eval_examples=len(eval_examples),
        **T.loss_summary(result.losses),
        rank_overlap=result.overlap,
    )
    if result.evals:
        report.summary.update({f"eval_{k}": v for k, v in result.evals[-1].items() if k != "step"})
    report.details.update(
        evals=result.evals,
        ranks=result.ranks,
        loss_curve=T.loss_curve(result.losses, result.start_step),
        process={"main": result.is_main, "processes": result.world_size},
    )
    if cfg.save_every:
        report.notes.append(f"training state saved under {state} (delete it once you no longer need `resume`)")
    return report


def _world_size() -> int:
    """Processes of this run (several under ``accelerate launch``); the data order depends on it."""
    from weightsmith.compress.distill.train import process_state

    return process_state().num_processes


def _float_dtype(ckpt: Checkpoint):
    import torch

    for info in ckpt.infos():
        if info.dtype.is_floating_point:
            return info.dtype
    return torch.float32


def _write(
    model, tok, source: Checkpoint, teacher: Checkpoint, out: Path, dtype, force: bool, params: dict, student_path
) -> None:
    """The trained student as a transformers directory: weights (tied copies once), config, tokenizer, carried files.

    Written through CheckpointWriter: a temporary sibling renamed into place, so ``out`` never holds a partial result.
    """
    inputs = [teacher] + ([source] if student_path is not None else [])
    with tempfile.TemporaryDirectory(prefix="weightsmith-tok-") as tok_tmp:
        tok.save_pretrained(tok_tmp)
        step = provenance_step("distill", params, inputs)
        with CheckpointWriter(
            out, steps=[step], config=source.config, carry=source.carry_files, dtype=dtype, force=force
        ) as writer:
            stored: set[int] = set()
            for name, tensor in model.state_dict().items():
                if (
                    tensor.data_ptr() in stored
                ):  # a tied weight (lm_head = embeddings): stored once, as transformers does
                    continue
                stored.add(tensor.data_ptr())
                writer.write(name, tensor.detach().cpu())
            for f in sorted(Path(tok_tmp).iterdir()):
                writer.add_file(f.name, f.read_bytes())
