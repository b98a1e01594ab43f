"""Build: the transformers model for a task, and ``torch.onnx.export`` of it.

Exporter: ``torch.onnx.export(dynamo=True)`` (torch's default and maintained path). Batch and sequence are
symbolic ``torch.export.Dim``s, so a model whose code fixes either one makes the export fail loudly instead of
silently baking the example shape into the graph, as tracing does. The example inputs are 2×16 (no size-1
dimension, which torch.export would specialise) and the model is built with eager attention (SDPA's ``is_causal``
path does not export).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from weightsmith.checkpoint import TensorSource
from weightsmith.errors import ConfigError, IncompatibleError, WeightsmithError
from weightsmith.export.to_onnx.config import TASKS, infer_task
from weightsmith.export.to_onnx.validate import example_inputs, max_positions

_TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_model(ckpt: TensorSource, task: str):
    """The transformers model for ``task`` in float32 with eager attention (eval mode); refusals in one line."""
    import transformers

    auto = getattr(transformers, TASKS[task].auto)
    assert ckpt.config is not None  # the pipeline refused a checkpoint without one
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
                + (f" ({natural})" if (natural := _natural(ckpt.config)) else "")
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
            f"lacks, e.g. {missing[0]!r} (is it the right task for this model?"
            + (f" {natural})" if (natural := _natural(ckpt.config)) else ")")
        )
    return model.eval()


def _natural(config: dict) -> str:
    """``"T5ForConditionalGeneration exports as text2text-generation"``: the task its head infers ("" if none)."""
    try:
        task = infer_task(config, "")
    except ConfigError:
        return ""
    return f"{config['architectures'][0]} exports as {task}"


def build(ckpt: TensorSource, task: str, tokenizer):
    """The model for ``task`` (no KV cache: one forward over the whole sequence) and the graph's input names (the
    tokenizer's, or the text inputs the model takes when there is no tokenizer)."""
    model = load_model(ckpt, task)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    params = inspect.signature(model.forward).parameters
    kind = TASKS[task].inputs
    if kind in ("pixels", "text+pixels") and "pixel_values" not in params:
        raise IncompatibleError(f"{ckpt.path}: model {type(model).__name__} does not take pixel_values")
    if kind == "pixels":
        return model, ("pixel_values",)
    if tokenizer is not None:
        names = [n for n in tokenizer.model_input_names if n in params]
    else:  # no tokenizer: token types only where the architecture has them (BERT-likes)
        names = [
            n
            for n in _TOKENIZER_INPUTS
            if n in params and (n != "token_type_ids" or bool(getattr(model.config, "type_vocab_size", 0)))
        ]
    if kind == "text+pixels":
        return model, (*names, "pixel_values")
    takes = [p for p in ("pixel_values", "input_features") if p in params]
    if "input_ids" not in names or "attention_mask" not in names or takes:
        raise IncompatibleError(
            f"{ckpt.path}: model {type(model).__name__} "
            f"{'takes ' + takes[0] if takes else 'does not take input_ids and attention_mask'}; "
            f"only text models are exported"
        )
    return model, tuple(names)


class Wrapper(torch.nn.Module):
    """Positional tensors in ``input_names`` order → the exported output, or a tuple of them (no cache, no dict)."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str]):
        super().__init__()
        self.model, self.input_names, self.output_names = model, tuple(input_names), tuple(output_names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, tensors)), return_dict=True)
        return out[self.output_names[0]] if len(self.output_names) == 1 else tuple(out[n] for n in self.output_names)


@contextlib.contextmanager
def quiet_exporter():
    # notes about torchvision ops this graph never uses; onnxscript's about constant folding it skipped
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter prints progress and warns about axis renames
            yield
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def export(wrapper: Wrapper, config, input_names: Sequence[str], path: Path, opset: int | None, big: bool) -> Path:
    """``torch.onnx.export(dynamo=True)`` with symbolic batch and sequence (images: batch; their size is the
    model's; texts and images together: a batch of each, as zero-shot scores any number of labels per image); one
    line if the exporter fails."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    both = "pixel_values" in input_names and "input_ids" in input_names
    images = torch.export.Dim("image_batch") if both else batch
    # size-1 dims specialise; 2 texts and 3 images keep the two batches apart
    example = example_inputs(config, input_names, 2, min(16, max_positions(config)), images=3 if both else None)
    axes = [{0: images} if n == "pixel_values" else {0: batch, 1: sequence} for n in input_names]
    path.parent.mkdir(parents=True)
    try:
        with quiet_exporter():
            torch.onnx.export(
                wrapper,
                tuple(example.values()),
                str(path),
                input_names=list(input_names),
                output_names=list(wrapper.output_names),
                opset_version=opset,
                dynamo=True,
                external_data=big,
                dynamic_shapes=(tuple(axes),),
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; each is one unexportable model
        raise export_error(wrapper.model, exc) from None
    return path


def export_error(model: torch.nn.Module, exc: Exception) -> WeightsmithError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return WeightsmithError(f"torch.onnx.export failed for {type(model).__name__}: {first}")


def ort_optimize(src: Path, path: Path, big: bool) -> Path:
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
