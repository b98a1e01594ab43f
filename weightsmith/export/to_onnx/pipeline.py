"""The ``export onnx`` verb end to end: check, stage, build, export, validate, quantize, benchmark, place.

Whatever the exporter does, the result is only kept after onnxruntime matches PyTorch at batch 1 and 8 and two
sequence lengths. Everything is staged in a sibling folder and moved into place at the end: an error leaves
nothing at the destination, not even the folders this export would have created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightsmith import hf
from weightsmith.checkpoint import Checkpoint, TensorSource, check_destination, provenance_step
from weightsmith.checkpoint.staging import staging_dir, storage_error
from weightsmith.checkpoint.writer import provenance_record, resolve_steps
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import ConfigError, DestinationError, IncompatibleError, NumericalError
from weightsmith.export.to_onnx import benchmark, build, decoder, files, quantize, seq2seq, validate
from weightsmith.export.to_onnx.config import TASKS, OnnxExport, Task, infer_task
from weightsmith.report import Report
from weightsmith.units import format_size


@dataclass
class _Graph:
    """A float graph exported and validated: what quantize, benchmark and placement need."""

    wrapper: torch.nn.Module
    config: Any  # the transformers config
    tokenizer: Any
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    path: Path
    session: Any
    inputs: dict[Any, Any]  # the int8 quality check's feeds (by shape; by file name for an encoder-decoder)
    big: bool
    parity: dict[str, float]
    facts: dict[str, Any] = field(default_factory=dict)  # summary entries of this kind of graph
    files: dict[str, Path] = field(default_factory=dict)  # destination file name → float graph (``path`` if one)
    sessions: dict[str, Any] = field(default_factory=dict)  # file name → its ORT session (encoder-decoders)
    shape: Any = None  # an encoder-decoder's ``Seq2SeqShape``

    def __post_init__(self) -> None:
        self.files = self.files or {self.path.name: self.path}


def run(src: TensorSource | str | os.PathLike, out: str | os.PathLike, config: OnnxExport, force: bool) -> Report:
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"{out}: the output must be a .onnx file path (the tokenizer is written beside it)")
    ckpt = as_checkpoint(src)
    _check_source(ckpt)
    assert ckpt.config is not None  # _check_source refused a checkpoint without one
    if config.task is None:
        config = dataclasses.replace(config, task=infer_task(ckpt.config, str(ckpt.path)))
    task = TASKS[str(config.task)]
    for name in seq2seq.GRAPHS if task.seq2seq else (out.name,):
        for path in (out.parent / name, out.parent / (name + ".data")):
            check_destination(path, force)
    report = Report("export onnx", output=str(out.parent if task.seq2seq else out))
    with _staged(out) as tmp:
        with report.timed("build"):
            floats = _dequantized(ckpt, tmp / "dequantized", report)
            tokenizer = hf.load_tokenizer(floats.root) if hf.has_tokenizer(floats.root) else None
        beside = files.write_beside(floats, tokenizer, tmp / "beside")
        files.check_beside(out.parent, beside, force)
        exporter = _seq2seq_graph if task.seq2seq else _decoder_graph if task.with_past else _float_graph
        graph = exporter(floats, tokenizer, task, config, tmp / "float" / out.name, out, report)
        finals = _quantized(graph, config, tmp / "int8", out, report) if config.quantize else graph.files
        if config.benchmark and not task.with_past:
            with report.timed("latency"):
                report.details["latency (median ms)"] = benchmark.latency(
                    graph.wrapper,
                    finals[out.name],
                    graph.path if config.quantize else None,
                    graph.config,
                    graph.input_names,
                )
        elif config.benchmark:
            report.notes.append("`benchmark`: generation speed is measured by bench/export_bench.py (tokens/s)")
        facts = _facts(finals)
        record = provenance_record(resolve_steps([provenance_step("export onnx", config.to_dict(), [ckpt])]))
        staged = {}
        for name, path in finals.items():
            files.stage_graph(path, tmp / "final" / name, graph.big, record)
            staged[tmp / "final" / name] = out.parent / name
        written = files.place(staged, beside, out, graph.big, force)
    _summarise(report, ckpt, task, config, graph, facts, out, written)
    return report


def _facts(finals: dict[str, Path]) -> dict[str, Any]:
    """Opset and node count of the graph (of all graphs together, for an encoder-decoder)."""
    each = [files.graph_facts(path) for path in finals.values()]
    return {"opset": each[0]["opset"], "nodes": sum(f["nodes"] for f in each)}


def _summarise(
    report: Report,
    ckpt: TensorSource,
    task: Task,
    config: OnnxExport,
    graph: _Graph,
    facts: dict,
    out: Path,
    written: list[str],
) -> None:
    report.summary.update(
        source=str(ckpt.path),
        task=task.name,
        exporter="torch.onnx.export (TorchScript)" if task.with_past else "torch.onnx.export (dynamo)",
        **facts,
        inputs=list(graph.input_names),
        output=task.output if len(task.outputs) == 1 else list(task.outputs),
        size=format_size(sum(files.onnx_size(out.parent / name) for name in graph.files)),
        quantize=config.quantize_name,
        optimized=config.optimize,
        parity_max_abs=max(graph.parity.values()),
        atol=config.atol,
    )
    key = "graph batch×sequence:past+new" if task.seq2seq else "batch×past+new" if task.with_past else "batch×sequence"
    report.details[f"parity (max |Δ| by {key})"] = graph.parity
    report.summary.update(graph.facts)
    report.details["files"] = written
    assert ckpt.config is not None  # _check_source refused a checkpoint without one
    stored = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "float32"
    if task.seq2seq:
        axes = (
            "batch, encoder and decoder sequence, past; caches as past_key_values.{i}.decoder|encoder.key/value → "
            "present.{i}.*"
        )
    elif task.with_past:
        axes = "batch, sequence, past and total sequence; KV cache as past_key_values.{i}.key/value → present.{i}.*"
    elif task.inputs == "pixels":
        axes = "batch (the image size is the model's)"
    elif task.inputs == "text+pixels":
        axes = "text batch, sequence and image batch (scores: images × texts); the image size is the model's"
    else:
        axes = "batch, sequence; no KV cache"
    report.notes.append(f"{stored} checkpoint exported in float32; dynamic axes: {axes}")


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A staging folder beside ``out``, removed at the end; on failure also the folders created for ``out``."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(out)
    except OSError as exc:
        err = storage_error(exc, out)
        raise (
            err if err is not None else DestinationError(f"{out}: cannot write here ({exc.strerror or exc})")
        ) from None
    done = False
    try:
        yield tmp
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created if not done else ():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty


def _check_source(ckpt: TensorSource) -> None:
    if ckpt.is_adapter:
        raise ConfigError(f"{ckpt.path}: a PEFT adapter; fold it into its base first (weightsmith lora merge)")
    if ckpt.config is None:
        raise ConfigError(f"{ckpt.path}: no config.json; ONNX export builds the model and needs a model directory")


def _dequantized(ckpt: TensorSource, folder: Path, report: Report) -> TensorSource:
    """A compressed-tensors int8 / bitsandbytes NF4 checkpoint written out as float32 (W = q·s, or bnb's
    dequantize_4bit) with weightsmith's own ``dequantize``; float checkpoints pass through."""
    assert ckpt.config is not None  # _check_source refused a checkpoint without one
    quant = ckpt.config.get("quantization_config")
    if not quant:
        return ckpt
    from weightsmith.compress.quantize.dequantize import dequantize

    method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
    dequantize(ckpt, folder, dtype="float32")
    report.notes.append(
        f"{method} checkpoint dequantized to float32 for export (W = q·s / NF4 codes × absmax); "
        f"`quantize` int8 makes the graph itself int8"
    )
    return Checkpoint(folder)


def _float_graph(
    ckpt: TensorSource, tokenizer, task: Task, config: OnnxExport, path: Path, out: Path, report: Report
) -> _Graph:
    """Export (and optionally optimize) the float graph; refuse it unless ORT matches PyTorch within ``atol``."""
    with report.timed("build"):
        model, input_names = build.build(ckpt, task.name, tokenizer)
    wrapper = build.Wrapper(model, input_names, task.outputs).eval()
    big = sum(p.numel() * 4 for p in model.parameters()) > files.EXTERNAL_DATA_BYTES
    with report.timed("export"):
        float_path = build.export(wrapper, model.config, input_names, path, config.opset, big)
    if config.optimize:
        with report.timed("optimize"):
            float_path = build.ort_optimize(float_path, path.parent.parent / "optimized" / path.name, big)
    shapes = validate.validation_shapes(model.config, input_names)
    inputs = {shape: validate.example_inputs(model.config, input_names, *shape) for shape in shapes}
    with report.timed("validate"):
        sess = hf.ort_session(float_path, threads=None)
        parity = validate.parity(wrapper, sess, inputs)
    _check_parity(parity, config, ", ".join(task.outputs), out, "batch×sequence")
    return _Graph(
        wrapper, model.config, tokenizer, tuple(input_names), task.outputs, float_path, sess, inputs, big, parity
    )


def _check_parity(parity: dict[str, float], config: OnnxExport, output: str, out: Path, key: str) -> None:
    worst_shape, worst = max(parity.items(), key=lambda kv: kv[1])
    if not worst <= config.atol:  # also catches NaN
        raise NumericalError(
            f"{out}: ONNX output {output!r} differs from PyTorch by max |Δ| {worst:.3g} "
            f"> atol {config.atol:g} at {key} {worst_shape}; nothing written"
        )


def _decoder_graph(
    ckpt: TensorSource, tokenizer, task: Task, config: OnnxExport, path: Path, out: Path, report: Report
) -> _Graph:
    """The causal LM with its KV cache: parity of logits and presents on first and cached steps, then greedy
    decoding through onnxruntime against transformers' ``generate`` token for token."""
    with report.timed("build"):
        model = build.load_model(ckpt, task.name)
        shape = decoder.cache_shape(model)
    wrapper = decoder.CachedDecoder(model, shape).eval()
    big = sum(p.numel() * 4 for p in model.parameters()) > files.EXTERNAL_DATA_BYTES
    vocab = model.config.vocab_size
    with report.timed("export"):
        float_path = decoder.export(wrapper, vocab, path, config.opset)
    if config.optimize:
        with report.timed("optimize"):
            float_path = build.ort_optimize(float_path, path.parent.parent / "optimized" / path.name, big)
    with report.timed("validate"):
        sess = hf.ort_session(float_path, threads=None)
        parity = decoder.parity(wrapper, sess, vocab)
        _check_parity(parity, config, "logits", out, "batch×past+new")
        agreement = validate.greedy_agreement(model, sess, vocab)
    if agreement["mismatch"]:
        raise NumericalError(f"{out}: greedy decoding through onnxruntime {agreement['mismatch']}; nothing written")
    quality_feeds = {f"{b}x{s}": decoder.example_feeds(shape, vocab, b, 0, s, seed=2) for b, s in ((1, 8), (4, 16))}
    facts = {
        "generation": agreement["summary"],
        "kv_cache": f"{shape.layers} layers × {shape.heads} heads × {shape.head_dim}",
    }
    names = tuple(shape.input_names())
    outputs = ("logits", *shape.present_names())
    return _Graph(wrapper, model.config, tokenizer, names, outputs, float_path, sess, quality_feeds, big, parity, facts)


def _seq2seq_graph(
    ckpt: TensorSource, tokenizer, task: Task, config: OnnxExport, path: Path, out: Path, report: Report
) -> _Graph:
    """An encoder-decoder as three graphs: parity of the encoder and of both decoders' logits and presents, then
    greedy decoding through onnxruntime against transformers' ``generate`` token for token."""
    with report.timed("build"):
        model = build.load_model(ckpt, task.name)
        shape = seq2seq.seq2seq_shape(model)
    if shape.speech != (task.inputs == "features"):
        takes = "input_features" if shape.speech else "input_ids"
        raise IncompatibleError(f"{ckpt.path}: task {task.name} is not supported for a model that takes {takes}")
    encoder, first = seq2seq.Encoder(model, shape).eval(), seq2seq.Decoder(model, shape, with_past=False).eval()
    big = sum(p.numel() * 4 for p in model.parameters()) > files.EXTERNAL_DATA_BYTES
    with report.timed("export"):
        paths = seq2seq.export_all(encoder, first, path.parent, config.opset)
    if config.optimize:
        with report.timed("optimize"):
            paths = {n: build.ort_optimize(p, path.parent.parent / "optimized" / n / n, big) for n, p in paths.items()}
    with report.timed("validate"):
        sessions = {name: hf.ort_session(p, threads=None) for name, p in paths.items()}
        parity = seq2seq.parity(encoder, first, sessions)
        _check_parity(parity, config, "logits", out, "graph batch×sequence:past+new")
        agreement = validate.seq2seq_greedy_agreement(model, shape, sessions)
    if agreement["mismatch"]:
        raise NumericalError(f"{out}: greedy decoding through onnxruntime {agreement['mismatch']}; nothing written")
    text = quantize.text_inputs(tokenizer, model.config, shape.encoder_inputs())
    enc_inputs = [text] if text else [seq2seq.encoder_feeds(shape, b, s, seed=2) for b, s in ((1, 8), (4, 16))]
    facts = {"generation": agreement["summary"], "graphs": list(paths)}
    names = tuple(shape.encoder_inputs())
    graph = _Graph(encoder, model.config, tokenizer, names, ("last_hidden_state",), paths[seq2seq.ENCODER], None,
                   {}, big, parity, facts, files=paths, sessions=sessions, shape=shape)  # fmt: skip
    graph.inputs = {
        seq2seq.ENCODER: enc_inputs,
        seq2seq.DECODER: [seq2seq.decoder_feeds(encoder, first, feeds, 0, 4, seed=2) for feeds in enc_inputs],
    }
    return graph


def _quantized(graph: _Graph, config: OnnxExport, folder: Path, out: Path, report: Report) -> dict[str, Path]:
    """The int8 graphs and their quality against the float graphs; refused below the scheme's ``min_cosine``."""
    scheme = config.quantize
    assert scheme is not None
    with report.timed("quantize"):
        int8 = {n: quantize.quantize_int8(p, folder / n / n, scheme, graph.big) for n, p in graph.files.items()}
        quality = _seq2seq_int8_quality(graph, int8) if graph.shape is not None else _int8_quality(graph, int8)
    float_size = sum(files.onnx_size(p) for p in graph.files.values())
    report.details["int8"] = {
        "weights": scheme.weights,
        **quality,
        "float_size": format_size(float_size),
        "size_ratio": round(sum(files.onnx_size(p) for p in int8.values()) / float_size, 4),
    }
    if not quality["cosine_mean"] >= scheme.min_cosine:
        raise NumericalError(
            f"{out}: int8 graph's outputs have mean cosine {quality['cosine_mean']:.4f} to "
            f"the float graph, below the int8 scheme's min_cosine {scheme.min_cosine}; nothing written"
        )
    return int8


def _int8_quality(graph: _Graph, int8: dict[str, Path]) -> dict[str, Any]:
    (int8_path,) = int8.values()
    text = quantize.text_inputs(graph.tokenizer, graph.config, graph.input_names)
    kind = " and ".join(
        k for n, k in (("input_ids", "token ids"), ("pixel_values", "pixel values")) if n in graph.input_names
    )
    quality: dict[str, Any] = {
        **quantize.int8_quality(
            graph.session, hf.ort_session(int8_path, threads=None), [text] if text else graph.inputs.values()
        ),
        "inputs": f"{len(quantize.QUALITY_TEXT)} sentences" if text else f"random {kind}",
    }
    if "generation" in graph.facts:  # how far greedy decoding with the int8 graph follows the float graph
        limit = validate.max_positions(graph.config)
        quality["greedy_token_agreement"] = validate.greedy_token_agreement(
            graph.session, hf.ort_session(int8_path, threads=None), graph.config.vocab_size, limit
        )
    return quality


def _seq2seq_int8_quality(graph: _Graph, int8: dict[str, Path]) -> dict[str, Any]:
    """Cosine of the encoder's states and of the first decoder step's logits (the worse one is ``cosine_mean``),
    and the fraction of greedy tokens the int8 graphs share with the float graphs."""
    sessions = {n: hf.ort_session(p, threads=None) for n, p in int8.items()}
    parts = {
        name: quantize.int8_quality(graph.sessions[name], sessions[name], graph.inputs[name])
        for name in (seq2seq.ENCODER, seq2seq.DECODER)
    }
    text = graph.shape is not None and not graph.shape.speech and graph.tokenizer is not None
    return {
        "cosine_mean": min(q["cosine_mean"] for q in parts.values()),
        **{f"{name.removesuffix('_model.onnx')}": q for name, q in parts.items()},
        "inputs": f"{len(quantize.QUALITY_TEXT)} sentences" if text else "random encoder inputs",
        "greedy_token_agreement": validate.seq2seq_token_agreement(graph.sessions, sessions, graph.shape, graph.config),
    }
