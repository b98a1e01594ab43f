"""The distill verb: check everything, build or read the student, train (``train``), write the student."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightsmith import hf
from weightsmith.checkpoint import Checkpoint, CheckpointWriter, TensorSource, check_destination, provenance_step
from weightsmith.compress.distill import data as D
from weightsmith.compress.distill import student as S
from weightsmith.compress.distill.config import DistillConfig, make_config
from weightsmith.compress.distill.kinds import Kind, kind_of
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import CheckpointError, ConfigError, IncompatibleError
from weightsmith.report import Report
from weightsmith.units import parse_dtype

__all__ = ["distill"]


def distill(
    teacher: TensorSource | str | os.PathLike,
    out: str | os.PathLike,
    data: str | os.PathLike,
    config: DistillConfig | dict | None = None,
    *,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    dtype: str | None = None,
    force: bool = False,
    **options: Any,
) -> Report:
    """Distil ``teacher`` into a student trained on ``data`` and write it to ``out``.

    ``config`` is a ``DistillConfig`` (or its fields as keyword ``options``): the student (``student`` checkpoint,
    or ``layers`` / ``keep_every`` of the teacher's own), the held-out data and the training hyper-parameters.

    Loss by kind (``kinds.KINDS``): causal LM  α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, next token)
    (Hinton et al. 2015); masked LM  the same on the BERT-masked positions (DistilBERT, Sanh et al. 2019, without its
    extra hidden-state cosine term unless ``feature_layers`` asks for it); encoders without a head  MSE + (1 − cos)
    on per-token and mean-pooled final hidden states. ``feature_layers`` adds FitNets' MSE between chosen student
    layers and their teacher counterparts, through a learned projection if widths differ: for a student built from
    kept layers k₀ < k₁ < …, student layer i matches teacher layer kᵢ₊₁ − 1 (whose output the copy of kᵢ₊₁ was
    trained to read; the last matches the teacher's last), for any other student the proportional layer (TinyBERT's
    uniform mapping). With all layers listed this is TinyBERT's hidden-state loss on every student layer.

    Throughput: ``group_by_length`` (default on) fills each batch with examples of similar length (transformers'
    length-grouped sampler; every example is still seen once per epoch), ``freeze_embeddings`` keeps the input token
    table at the teacher's, ``mixed_precision="bf16"`` runs both forwards under bf16 autocast while weights,
    optimizer state and the reported evaluation stay float32.

    Training state is saved under ``state_dir`` (default ``OUT.distill-state``) every ``save_every`` steps;
    ``resume=True`` continues from the newest state exactly (same data order, optimizer, scheduler and RNG).

    >>> ws.distill("minilm", "minilm-3l", "corpus.txt", layers=[0, 2, 4], steps=300)  # doctest: +SKIP
    """
    cfg = make_config(config, **options)
    out = Path(out)
    target_dtype = parse_dtype(dtype)
    report = Report("distill", output=str(out))
    with report.timed("prepare"):
        setup = _prepare(teacher, out, data, cfg, force)
        state = Path(state_dir) if state_dir is not None else out.parent / f"{out.name}.distill-state"
    result = _train_and_write(setup, cfg, report, data, out, state, resume, target_dtype, force)
    _summarise(report, setup, result, cfg)
    if cfg.save_every:
        report.notes.append(f"training state saved under {state} (delete it once you no longer need `resume`)")
    return report


def _train_and_write(
    setup: _Setup,
    cfg: DistillConfig,
    report: Report,
    data: str | os.PathLike,
    out: Path,
    state: Path,
    resume: bool,
    target_dtype: Any,
    force: bool,
) -> Any:
    """Build the student (from kept layers, or the one given), train it, and write it from the main process."""
    from weightsmith.compress.distill import train as T

    with tempfile.TemporaryDirectory(prefix="weightsmith-student-") as tmp:
        if setup.kept is not None:
            with report.timed("init_student"):
                s_dir = S.write_student(setup.teacher, Path(tmp) / "student", setup.kept)
        else:
            assert setup.student is not None  # a student is given when no layers are kept from the teacher
            s_dir = setup.student.path
        plan = T.Plan(
            kind=setup.kind.name,
            teacher_dir=setup.teacher.path,
            student_dir=s_dir,
            model_class=setup.model_class,
            tokenizer=setup.tokenizer,
            train=setup.train,
            eval=setup.eval,
            steps=setup.steps,
            feature_pairs=setup.pairs,
            config=cfg,
            state_dir=state,
            resume=resume,
            fingerprint=setup.fingerprint(data),
        )
        T.check_resume(plan)
        with report.timed("train"):
            result = T.run(plan)
        source = Checkpoint(s_dir)
        if result.is_main:
            with report.timed("write"):
                params = {"layers": setup.kept, "data": str(data), "steps": setup.steps, **cfg.hyper()}
                inputs = [setup.teacher] + ([source] if cfg.student is not None else [])
                _write(
                    result.student,
                    setup.tokenizer,
                    source,
                    inputs,
                    out,
                    target_dtype or _float_dtype(source),
                    force,
                    params,
                )
        T.finish(result)
    return result


@dataclass
class _Setup:
    """Everything ``distill`` resolved and checked before any training starts."""

    teacher: TensorSource
    kind: Kind
    model_class: Any
    teacher_layers: int
    kept: list[int] | None  # teacher layers the student is built from (None: a student checkpoint)
    student: TensorSource | None
    student_layers: int
    pairs: list[tuple[int, int]]  # (student layer, teacher layer) of the feature loss
    tokenizer: Any
    tokenizer_dir: Path
    train: list[Any]
    eval: list[Any]
    steps: int
    world: int
    config: DistillConfig

    def fingerprint(self, data: str | os.PathLike) -> dict:
        """What a resumed run must share with the run that saved the state."""
        fingerprint = {
            "teacher": str(self.teacher.path.resolve()),
            "student": str(Path(self.config.student).resolve()) if self.config.student else None,
            "layers": self.kept,
            "data": str(Path(data).resolve()),
            "tokenizer": str(self.tokenizer_dir.resolve()),
            "steps": self.steps,
            "processes": self.world,
            **self.config.hyper(),
        }
        return json.loads(json.dumps(fingerprint))  # tuples → lists, as the saved copy reads back


def _prepare(teacher, out: Path, data, cfg: DistillConfig, force: bool) -> _Setup:
    """Read and check the teacher, the student choice and the data; nothing is written."""
    t_ckpt = as_checkpoint(teacher)
    if t_ckpt.config is None:
        raise CheckpointError(f"{t_ckpt.path}: no config.json; the teacher must be a transformers model directory")
    check_destination(out, force)
    model_class = hf.model_class(t_ckpt.config, t_ckpt.path)
    reads = getattr(model_class, "main_input_name", "input_ids")
    kind = kind_of(hf.architecture(t_ckpt.config), t_ckpt.path, t_ckpt.config, reads)
    if kind.data not in ("images", "audio") and reads != "input_ids":
        raise IncompatibleError(
            f"{t_ckpt.path}: a {hf.architecture(t_ckpt.config)} reads {reads}, not text; "
            "distillation trains text, image-classification, text-to-text and speech-recognition models"
        )
    t_layers = S.layer_count(t_ckpt.config, t_ckpt.path)
    kept, s_ckpt, s_layers = _choose_student(t_ckpt, t_layers, kind, cfg)
    bad = [i for i in cfg.feature_layers if i >= s_layers]
    if bad:
        raise ConfigError(f"feature_layers {bad}: out of range, the student has layers 0..{s_layers - 1}")
    pairs = [(i, S.teacher_counterpart(i, kept, t_layers, s_layers)) for i in cfg.feature_layers]
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer is not None else t_ckpt.path
    tok, train, held_out = _read_data(kind, data, cfg, tok_dir, t_ckpt.path)
    world = _world_size()
    steps = cfg.steps or D.Order(len(train), cfg.batch_size, world, cfg.seed).steps_for_epochs(cfg.epochs or 1.0)
    if steps < 1:
        raise ConfigError(
            f"{data}: {len(train)} examples give zero steps at a global batch of "
            f"{cfg.batch_size * world}; give `steps` or more `epochs`"
        )
    return _Setup(
        t_ckpt,
        kind,
        model_class,
        t_layers,
        kept,
        s_ckpt,
        s_layers,
        pairs,
        tok,
        tok_dir,
        train,
        held_out,
        steps,
        world,
        cfg,
    )


def _choose_student(t_ckpt: TensorSource, t_layers: int, kind: Kind, cfg: DistillConfig):
    """(kept teacher layers or None, the student checkpoint or None, the student's layer count)."""
    if cfg.student is not None:
        s_ckpt = as_checkpoint(cfg.student)
        _check_student(t_ckpt, s_ckpt, kind)
        return None, s_ckpt, S.layer_count(s_ckpt.config, s_ckpt.path)
    kept = S.resolve_layers(t_layers, cfg.layers, cfg.keep_every, t_ckpt.path)
    S.check_first_layer(t_ckpt, kept)
    S.student_config(t_ckpt.config or {}, kept)  # refuses a config whose stacks cannot be cut alike
    return kept, None, len(kept)


def _read_data(kind: Kind, data, cfg: DistillConfig, tok_dir: Path, teacher: Path) -> tuple[Any, list, list]:
    """(tokenizer or None, training examples, held-out examples) for the kind's data format."""
    reader = {"text": _text_data, "images": _image_data, "pairs": _pair_data, "audio": _audio_data}[kind.data]
    tok, train = reader(kind, data, "data file", cfg, tok_dir, teacher, None)
    held_out = (
        reader(kind, cfg.eval_data, "evaluation data file", cfg, tok_dir, teacher, tok)[1] if cfg.eval_data else []
    )
    if not train:
        raise ConfigError(f"{data}: no training example survives tokenisation (text too short?)")
    return tok, train, held_out


def _text_data(kind: Kind, path, what: str, cfg: DistillConfig, tok_dir: Path, teacher: Path, tok) -> tuple[Any, list]:
    """Token-id examples of a .txt/.jsonl file (causal LMs packed into blocks, others one per document)."""
    texts = hf.read_texts(path, what=what)
    tok = tok if tok is not None else _load_tokenizer(tok_dir, kind)
    return tok, D.tokenize(texts, tok, causal=kind.name == "causal", seq_len=cfg.seq_len)


def _image_data(kind: Kind, path, what: str, cfg: DistillConfig, tok_dir: Path, teacher: Path, tok) -> tuple[Any, list]:
    """(pixel values, class) examples of a class_name/*.png folder through the teacher's image processor (no
    tokenizer: the output carries the teacher's preprocessor_config.json instead)."""
    return None, D.image_examples(path, hf.load_image_processor(tok_dir))


def _pair_data(kind: Kind, path, what: str, cfg: DistillConfig, tok_dir: Path, teacher: Path, tok) -> tuple[Any, list]:
    """(source, target) id pairs of a .txt/.jsonl file: a record's ``target`` where it has one, else the teacher's
    own greedy output for its ``text`` (sequence-level KD, Kim & Rush 2016: the student learns what the teacher
    says rather than references the teacher may not reproduce)."""
    records = hf.read_records(path, what=what)
    tok = tok if tok is not None else _load_tokenizer(tok_dir, kind)
    sources = [r["text"] for r in records]
    missing = [i for i, r in enumerate(records) if not isinstance(r.get("target"), str)]
    targets: list = [r.get("target") for r in records]
    if missing:
        model = hf.load_model(teacher)
        generated = hf.greedy_outputs(model, tok, [sources[i] for i in missing], max_length=cfg.seq_len)
        for i, ids in zip(missing, generated, strict=True):
            targets[i] = ids
        targets = [t if not isinstance(t, str) else tok(text_target=t)["input_ids"] for t in targets]
    return tok, D.pair_examples(sources, targets, tok, seq_len=cfg.seq_len)


def _audio_data(kind: Kind, path, what: str, cfg: DistillConfig, tok_dir: Path, teacher: Path, tok) -> tuple[Any, list]:
    """(features, decoder prompt, transcript ids) per audio file of a .wav folder or .jsonl list, through the
    teacher's feature extractor: a record's ``target`` transcript (read by the tokenizer) where it has one, else the
    teacher's own greedy transcript (sequence-level KD, as for seq2seq). The prompt is the teacher's generation
    config's (``evaluation.speech.decoder_prompt``); no tokenizer is needed when every transcript is the teacher's."""
    from weightsmith import audio
    from weightsmith.evaluation import speech

    records = audio.read_audio_records(path, what=what)
    extractor = hf.load_feature_extractor(teacher)
    if tok is None and any(isinstance(r.get("target"), str) for r in records):
        tok = _load_tokenizer(tok_dir, kind)
    model = hf.load_model(teacher)
    room = int(getattr(model.config, "max_target_positions", None) or cfg.seq_len + 8)
    examples = []
    for r in records:
        features = speech.speech_features(extractor, r["audio"])  # (1, mel bins, frames)
        prompt = speech.decoder_prompt(model, features)
        new = min(cfg.seq_len, room - len(prompt))
        if isinstance(r.get("target"), str):
            target = speech.transcript_ids(tok, r["target"], new)
        else:
            target = speech.greedy_transcript(model, features, prompt, max_new_tokens=new)
        if target:
            examples.append((features[0], prompt, target))
    return tok, examples


def _load_tokenizer(path: Path, kind: Kind):
    try:
        return hf.load_tokenizer(path, pad_with_eos=True, need_mask=kind.name == "masked")
    except CheckpointError as exc:
        if "mask token" in str(exc):
            raise
        raise CheckpointError(f"{exc}; pass `tokenizer`") from None


def _embedding_rows(ckpt: TensorSource) -> int | None:
    for name in ckpt:
        if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")):
            return ckpt.info(name).shape[0]
    return None


def _check_student(teacher: TensorSource, student: TensorSource, kind: Kind) -> None:
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
    t_labels, s_labels = len(teacher.config.get("id2label") or {}), len(student.config.get("id2label") or {})
    if kind.name == "image" and t_labels != s_labels:
        raise IncompatibleError(f"{student.path}: {s_labels} classes, the teacher has {t_labels}")
    s_arch = hf.architecture(student.config)
    s_reads = getattr(hf.model_class(student.config, student.path), "main_input_name", "input_ids") if s_arch else ""
    if not s_arch or kind_of(s_arch, reads=s_reads) != kind:
        t_arch = hf.architecture(teacher.config)
        raise IncompatibleError(
            f"{student.path}: a {s_arch or 'model without architecture'} cannot be distilled "
            f"from a {t_arch} (different outputs)"
        )


def _summarise(report: Report, setup: _Setup, result, cfg: DistillConfig) -> None:
    from weightsmith.compress.distill import train as T

    report.summary.update(
        kind=setup.kind.name,
        teacher=str(setup.teacher.path),
        teacher_layers=setup.teacher_layers,
        student=str(cfg.student) if cfg.student else f"teacher layers {setup.kept}",
        student_layers=setup.student_layers,
        steps=setup.steps,
        resumed_from=result.start_step or None,
        processes=result.world_size,
        train_examples=len(setup.train),
        eval_examples=len(setup.eval),
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


def _world_size() -> int:
    """Processes of this run (several under ``accelerate launch``); the data order depends on it."""
    from weightsmith.compress.distill.train import process_state

    return process_state().num_processes


def _float_dtype(ckpt: TensorSource):
    import torch

    for info in ckpt.infos():
        if info.dtype.is_floating_point:
            return info.dtype
    return torch.float32


def _write(
    model, tok, source: TensorSource, inputs: list[TensorSource], out: Path, dtype, force: bool, params: dict
) -> None:
    """The trained student as a transformers directory: weights (tied copies once), config, tokenizer, carried files.

    Written through CheckpointWriter: a temporary sibling renamed into place, so ``out`` never holds a partial result.
    """
    with tempfile.TemporaryDirectory(prefix="weightsmith-tok-") as tok_tmp:
        if tok is not None:
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
