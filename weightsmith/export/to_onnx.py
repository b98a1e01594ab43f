"""``export onnx``: a transformers checkpoint as an ONNX graph, always validated with onnxruntime against PyTorch.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch's default and maintained path; the TorchScript exporter is
deprecated). Batch and sequence are symbolic ``torch.export.Dim``s, so a model whose code fixes either one makes
the export fail loudly instead of silently baking the example shape into the graph, as tracing does. The example
inputs are 2×16 (no size-1 dimension, which torch.export would specialise) and the model is built with eager
attention (SDPA's ``is_causal`` path does not export). Whatever the exporter does, the result is only kept after
onnxruntime matches PyTorch at batch 1 and 8 and two sequence lengths.
"""

from __future__ import annotations

import contextlib
import filecmp
import functools
import inspect
import io
import logging
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from weightsmith import architecture
from weightsmith.checkpoint import Checkpoint, check_destination, provenance_step
from weightsmith.checkpoint.staging import staging_dir, storage_error
from weightsmith.checkpoint.writer import provenance_record, resolve_steps
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import (
    ConfigError,
    DestinationError,
    IncompatibleError,
    NumericalError,
    WeightsmithError,
)
from weightsmith.report import Report
from weightsmith.units import format_size

# task -> (transformers auto class, the output exported)
TASKS = {
    "feature-extraction": ("AutoModel", "last_hidden_state"),
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
    "causal-lm": ("AutoModelForCausalLM", "logits"),
    "masked-lm": ("AutoModelForMaskedLM", "logits"),
}
QUANTIZE = ("int8",)
EXTERNAL_DATA_BYTES = 2 * 10**9 - 2**26  # protobuf's 2 GiB limit, less headroom for the graph itself
VALIDATION_BATCHES = (1, 8)
VALIDATION_SEQUENCES = (8, 128)  # clipped to the model's max_position_embeddings
# Mean per-position cosine of int8 vs float outputs below which the int8 file is refused. 0.98, not 0.99: per token
# is stricter than per sentence (MiniLM on real text: 0.991 per token, 0.993 mean-pooled).
INT8_MIN_COSINE = 0.98
# Text for the int8 check when the model has a tokenizer (random ids exaggerate activation outliers).
QUALITY_TEXT = (
    "The committee postponed its decision until the next meeting.",
    "Fresh bread smells wonderful early in the morning.",
    "How many moons does Jupiter have?",
    "The river flooded the valley after three days of rain.",
    "She solved the puzzle faster than anyone expected.",
    "Interest rates are likely to stay unchanged this year.",
    "A small dog barked at the delivery van.",
    "The algorithm sorts the list in linear time for small integers.",
)
LATENCY_THREADS = 1  # fixed for torch and onnxruntime: with 2 shared cores more threads only add noise
LATENCY_REPEATS = 3  # after one warm-up run; the median of three
_TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def onnx(
    src: Checkpoint | str | os.PathLike,
    out: str | os.PathLike,
    *,
    task: str,
    opset: int | None = None,
    quantize: str | None = None,
    optimize: bool = False,
    atol: float = 1e-4,
    force: bool = False,
) -> Report:
    """Export ``src`` to the ONNX file ``out`` for ``task`` and validate it; the tokenizer and config go beside it.

    Validation: onnxruntime vs PyTorch (float32) on batch {1, 8} × sequence {8, 128} (clipped to the model's
    positions), padded rows included, max |Δ| over non-pad positions; above ``atol`` the export is refused and
    nothing is written. ``quantize="int8"``: onnxruntime ``quantize_dynamic`` (QInt8 weights per output channel,
    activations quantized per call: MatMulInteger), checked against the float graph by cosine and relative error
    ‖q − f‖ / ‖f‖ (on built-in sentences when there is a tokenizer); refused below a mean per-position cosine
    of 0.98. ``optimize``: onnxruntime's extended graph optimizations
    (constant folding, fusions of LayerNorm, GELU, attention) saved into the file. The report gives opset, nodes,
    size, parity and median latency of ORT vs PyTorch eager at 8×128 with one thread each.

    >>> ws.export.onnx(  # doctest: +SKIP
    ...     "all-MiniLM-L6-v2/", "minilm/model.onnx", task="feature-extraction", quantize="int8")
    """
    out = Path(out)
    _check_options(out, task, opset, quantize, atol)
    data_file = out.with_name(out.name + ".data")
    for path in (out, data_file):
        check_destination(path, force)
    ckpt = as_checkpoint(src)
    _check_source(ckpt)
    report = Report("export onnx", output=str(out))
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # removed again on failure
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
        with report.timed("build"):
            floats = _dequantized(ckpt, tmp / "dequantized", report)
            model, tokenizer, input_names, output_name = _build(floats, task)
        wrapper = _Wrapper(model, input_names, output_name).eval()
        beside = _write_beside(floats, tokenizer, tmp / "beside")
        _check_beside(out.parent, beside, force)
        big = sum(p.numel() * 4 for p in model.parameters()) > EXTERNAL_DATA_BYTES
        with report.timed("export"):
            float_path = _export(wrapper, model.config, input_names, output_name, tmp / "float" / out.name, opset, big)
        if optimize:
            with report.timed("optimize"):
                float_path = _ort_optimize(float_path, tmp / "optimized" / out.name, big)
        shapes = _validation_shapes(model.config)
        inputs = {shape: _inputs(model.config, input_names, *shape) for shape in shapes}
        with report.timed("validate"):
            float_sess = _session(float_path)
            parity = {}
            for (b, s), feeds in inputs.items():
                expected = _torch_run(wrapper, feeds)
                got = torch.from_numpy(_ort_run(float_sess, feeds))
                parity[f"{b}x{s}"] = _max_abs(got, expected, feeds["attention_mask"])
        worst_shape, worst = max(parity.items(), key=lambda kv: kv[1])
        if not worst <= atol:  # also catches NaN
            raise NumericalError(
                f"{out}: ONNX output {output_name!r} differs from PyTorch by max |Δ| {worst:.3g} "
                f"> atol {atol:g} at batch×sequence {worst_shape}; nothing written"
            )
        final_path = float_path
        float_size = _onnx_size(float_path)
        if quantize == "int8":
            with report.timed("quantize"):
                final_path = _quantize_int8(float_path, tmp / "int8" / out.name, big)
                text = _text_inputs(tokenizer, model.config, input_names)
                quality: dict[str, Any] = {
                    **_int8_quality(float_sess, _session(final_path), [text] if text else inputs.values()),
                    "inputs": f"{len(QUALITY_TEXT)} sentences" if text else "random token ids",
                }
            report.details["int8"] = {
                **quality,
                "float_size": format_size(float_size),
                "size_ratio": round(_onnx_size(final_path) / float_size, 4),
            }
            if not quality["cosine_mean"] >= INT8_MIN_COSINE:
                raise NumericalError(
                    f"{out}: int8 graph's outputs have mean cosine {quality['cosine_mean']:.4f} to "
                    f"the float graph, below {INT8_MIN_COSINE}; nothing written"
                )
        with report.timed("latency"):
            latency = _latency(wrapper, final_path, float_path if quantize else None, model.config, input_names)
        graph = _graph_facts(final_path)
        params = {"task": task, "opset": opset, "quantize": quantize, "optimize": optimize, "atol": atol}
        record = provenance_record(resolve_steps([provenance_step("export onnx", params, [ckpt])]))
        written = _place(final_path, beside, out, data_file, big, force, record)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created if not done else ():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
    report.summary.update(
        source=str(ckpt.path),
        task=task,
        exporter="torch.onnx.export (dynamo)",
        **graph,
        inputs=list(input_names),
        output=output_name,
        size=format_size(_onnx_size(out)),
        quantize=quantize,
        optimized=optimize,
        parity_max_abs=worst,
        atol=atol,
    )
    report.details["parity (max |Δ| by batch×sequence)"] = parity
    report.details["latency (median ms)"] = latency
    report.details["files"] = written
    assert ckpt.config is not None  # _check_source refused a checkpoint without one
    stored = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype") or "float32"
    report.notes.append(f"{stored} checkpoint exported in float32; dynamic axes: batch, sequence; no KV cache")
    return report


# -- checks (before anything is built) --------------------------------------------------------------------------


def _check_options(out: Path, task: str, opset: int | None, quantize: str | None, atol: float) -> None:
    if task not in TASKS:
        raise ConfigError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"quantize {quantize!r}: expected one of {', '.join(QUANTIZE)}")
    if opset is not None and not (isinstance(opset, int) and 18 <= opset <= 23):
        raise ConfigError(f"opset {opset!r}: the dynamo exporter writes opsets 18 to 23")
    if not (isinstance(atol, (int, float)) and atol > 0):
        raise ConfigError(f"atol {atol!r}: expected a positive number")
    if out.suffix != ".onnx":
        raise ConfigError(f"{out}: the output must be a .onnx file path (the tokenizer is written beside it)")


def _check_source(ckpt: Checkpoint) -> None:
    if ckpt.is_adapter:
        raise ConfigError(f"{ckpt.path}: a PEFT adapter; fold it into its base first (weightsmith lora merge)")
    if ckpt.config is None:
        raise ConfigError(f"{ckpt.path}: no config.json; ONNX export builds the model and needs a model directory")


def _dequantized(ckpt: Checkpoint, folder: Path, report: Report) -> Checkpoint:
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


def _check_beside(folder: Path, beside: Path, force: bool) -> None:
    """Tokenizer/config files beside the .onnx may already be there from another export: equal content is fine."""
    if force:
        return
    for f in sorted(beside.iterdir()):
        target = folder / f.name
        if target.exists() and not (target.is_file() and filecmp.cmp(f, target, shallow=False)):
            raise DestinationError(f"{target}: already exists with other content (set `force` to replace it)")


# -- the model --------------------------------------------------------------------------------------------------


def _build(ckpt: Checkpoint, task: str):
    """The transformers model for ``task`` in float32 with eager attention, its tokenizer (or None), input names."""
    import transformers

    auto_name, output_name = TASKS[task]
    auto = getattr(transformers, auto_name)
    assert ckpt.config is not None  # _check_source refused a checkpoint without one
    model_type = ckpt.config.get("model_type", "?")
    bars, verbosity = transformers.utils.logging.is_progress_bar_enabled(), transformers.logging.get_verbosity()
    transformers.utils.logging.disable_progress_bar()  # our refusal below is the one line; no load report around it
    transformers.logging.set_verbosity_error()
    try:
        model, info = auto.from_pretrained(
            ckpt.root, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise IncompatibleError(
                f"{ckpt.path}: task {task} is not supported for model_type {model_type!r}"
            ) from None
        raise
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise IncompatibleError(
            f"{ckpt.path}: task {task} needs {len(missing)} tensor(s) this {model_type} checkpoint "
            f"lacks, e.g. {missing[0]!r} (is it the right task for this model?)"
        )
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache: one forward over the whole sequence
    tokenizer = _tokenizer(ckpt.root)
    params = inspect.signature(model.forward).parameters
    if tokenizer is not None:
        names = [n for n in tokenizer.model_input_names if n in params]
    else:  # no tokenizer: token types only where the architecture has them (BERT-likes)
        names = [
            n
            for n in _TOKENIZER_INPUTS
            if n in params and (n != "token_type_ids" or bool(getattr(model.config, "type_vocab_size", 0)))
        ]
    takes = [p for p in ("pixel_values", "input_features") if p in params]
    if "input_ids" not in names or "attention_mask" not in names or takes:
        raise IncompatibleError(
            f"{ckpt.path}: model {type(model).__name__} "
            f"{'takes ' + takes[0] if takes else 'does not take input_ids and attention_mask'}; "
            f"only text models are exported"
        )
    return model, tokenizer, tuple(names), output_name


def _tokenizer(root: Path):
    if not any((root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(root)


class _Wrapper(torch.nn.Module):
    """Positional tensors in ``input_names`` order → the one exported output (no cache, no dict)."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], output_name: str):
        super().__init__()
        self.model, self.input_names, self.output_name = model, tuple(input_names), output_name

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, tensors))
        return self.model(**kwargs, return_dict=True)[self.output_name]


def _write_beside(ckpt: Checkpoint, tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    shutil.copy2(ckpt.root / "config.json", folder / "config.json")
    return folder


# -- export, optimize, quantize ---------------------------------------------------------------------------------


def _export(
    wrapper: _Wrapper, config, input_names: Sequence[str], output_name: str, path: Path, opset: int | None, big: bool
) -> Path:
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    example = _inputs(config, input_names, 2, min(16, _max_positions(config)))  # no size-1 dims: they specialise
    path.parent.mkdir(parents=True)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # notes about torchvision ops this graph never uses
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter prints progress and warns about axis renames
            torch.onnx.export(
                wrapper,
                tuple(example.values()),
                str(path),
                input_names=list(input_names),
                output_names=[output_name],
                opset_version=opset,
                dynamo=True,
                external_data=big,
                dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in input_names),),
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; each is one unexportable model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsmithError(f"torch.onnx.export failed for {type(wrapper.model).__name__}: {first}") from None
    finally:
        quiet.setLevel(level)
    return path


def _ort_optimize(src: Path, path: Path, big: bool) -> Path:
    """onnxruntime's extended (hardware-independent) graph optimizations, written out as a model file."""
    import onnxruntime as ort

    path.parent.mkdir(parents=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    if big:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", path.name + ".data")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return path


def _quantize_int8(src: Path, path: Path, big: bool) -> Path:
    """onnxruntime dynamic quantization: int8 weights per output channel, activation scales computed per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path.parent.mkdir(parents=True)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its advice to pre-process is for static (calibrated) quantization
    try:
        quantize_dynamic(src, path, per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=big)
    finally:
        logging.disable(previous)
    return path


def _place(
    model_path: Path, beside: Path, out: Path, data_file: Path, big: bool, force: bool, provenance: str
) -> list[str]:
    """Move the finished files into place: beside-files first, the .onnx last (its presence means complete).
    The graph's metadata gets the provenance record (key ``weightsmith``), as safetensors outputs do."""
    import onnx as onnx_lib

    staged = model_path.parent.parent / "final" / out.name
    staged.parent.mkdir()
    proto = onnx_lib.load(str(model_path), load_external_data=big)
    onnx_lib.helper.set_model_props(
        proto, {**{p.key: p.value for p in proto.metadata_props}, "weightsmith": provenance}
    )
    if big:  # one data file named after the output, whatever the exporter or quantizer called theirs
        onnx_lib.save_model(
            proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data_file.name
        )
    else:
        onnx_lib.save_model(proto, str(staged))
    check_destination(out, force)  # again: something may have appeared while we worked
    written = []
    for f in sorted(beside.iterdir()):
        os.replace(f, out.parent / f.name)
        written.append(str(out.parent / f.name))
    if big:
        os.replace(staged.with_name(data_file.name), data_file)
        written.append(str(data_file))
    elif data_file.exists():
        data_file.unlink()  # a stale data file of an earlier (forced-over) export
    os.replace(staged, out)
    return [str(out), *written]


# -- running and comparing --------------------------------------------------------------------------------------


def _max_positions(config) -> int:
    return architecture.max_positions(config if isinstance(config, dict) else config.to_dict())


def _validation_shapes(config) -> list[tuple[int, int]]:
    limit = _max_positions(config)
    sequences = sorted({min(s, limit) for s in VALIDATION_SEQUENCES})
    return [(b, s) for b in VALIDATION_BATCHES for s in sequences]


def _inputs(config, input_names: Sequence[str], batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids; right padding with rows shortened down to half length (row 0 full) when batch > 1."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch * 1009 + seq)
    feeds = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=gen)}
    lengths = [seq - (i * seq) // (2 * batch) for i in range(batch)]  # (batch,) from seq down to ~seq/2
    feeds["attention_mask"] = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    if "token_type_ids" in input_names:
        feeds["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return {n: feeds[n] for n in input_names}


def _text_inputs(tokenizer, config, input_names: Sequence[str]) -> dict[str, torch.Tensor] | None:
    if tokenizer is None or tokenizer.pad_token is None:
        return None
    batch = tokenizer(
        list(QUALITY_TEXT),
        padding=True,
        truncation=True,
        max_length=min(128, _max_positions(config)),
        return_tensors="pt",
    )
    return {n: batch[n] for n in input_names} if all(n in batch for n in input_names) else None


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _torch_run(wrapper: _Wrapper, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return wrapper(*feeds.values()).float()


def _ort_run(session, feeds: dict[str, torch.Tensor]):
    return session.run(None, {n: t.numpy() for n, t in feeds.items()})[0]


def _real_positions(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, …) outputs → the non-pad rows (n, features); pooled (batch, …) outputs → (batch, features)."""
    if output.dim() >= 3 and output.shape[:2] == mask.shape:
        return output[mask.bool()].reshape(int(mask.sum()), -1)
    return output.reshape(output.shape[0], -1)


def _max_abs(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    return (_real_positions(got, mask) - _real_positions(expected, mask)).abs().max().item()


def _int8_quality(float_sess, int8_sess, inputs) -> dict[str, float]:
    """Per-position cosine (mean, min) and ‖q − f‖ / ‖f‖ of the int8 graph's outputs against the float graph's;
    for per-position outputs also the cosine of their mean over the non-pad positions (a sentence embedding)."""
    cosines, pooled, err, norm = [], [], 0.0, 0.0
    for feeds in inputs:
        mask = feeds["attention_mask"]
        f = _real_positions(torch.from_numpy(_ort_run(float_sess, feeds)).double(), mask)
        q = _real_positions(torch.from_numpy(_ort_run(int8_sess, feeds)).double(), mask)
        cosines.append(torch.nn.functional.cosine_similarity(q, f, dim=-1))
        if f.shape[0] == int(mask.sum()):  # per-position rows: pool each sequence's rows
            owner = torch.arange(mask.shape[0]).repeat_interleave(mask.sum(1))  # (n,) row → sequence
            sums = [torch.zeros(mask.shape[0], f.shape[1], dtype=f.dtype).index_add_(0, owner, x) for x in (q, f)]
            pooled.append(torch.nn.functional.cosine_similarity(sums[0], sums[1], dim=-1))
        err += (q - f).pow(2).sum().item()
        norm += f.pow(2).sum().item()
    cos = torch.cat(cosines)
    quality = {
        "cosine_mean": round(cos.mean().item(), 6),
        "cosine_min": round(cos.min().item(), 6),
        "relative_error": round((err / norm) ** 0.5, 6),
    }
    if pooled:
        quality["pooled_cosine_mean"] = round(torch.cat(pooled).mean().item(), 6)
    return quality


def _median_ms(fn: Callable[[], object]) -> float:
    fn()  # warm-up: first-call allocations and ORT's lazy initialisation
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def _latency(wrapper: _Wrapper, final_path: Path, float_path: Path | None, config, input_names) -> dict:
    """Median latency of PyTorch eager, the written graph (and the float graph when int8) at 8×128, fixed threads."""
    seq = min(128, _max_positions(config))
    feeds = _inputs(config, input_names, 8, seq, seed=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        result: dict[str, Any] = {
            "shape": f"8x{seq}",
            "threads": LATENCY_THREADS,
            "torch_eager": _median_ms(lambda: _torch_run(wrapper, feeds)),
        }
    finally:
        torch.set_num_threads(previous)
    graphs = {"ort_float": float_path, "ort_int8": final_path} if float_path else {"ort_float": final_path}
    for key, path in graphs.items():
        session = _session(path, LATENCY_THREADS)
        result[key] = _median_ms(functools.partial(_ort_run, session, feeds))
    result["ort_speedup_vs_torch"] = round(result["torch_eager"] / result[list(graphs)[-1]], 3)
    return result


def _onnx_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _graph_facts(path: Path) -> dict:
    import onnx as onnx_lib

    proto = onnx_lib.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "nodes": len(proto.graph.node)}
