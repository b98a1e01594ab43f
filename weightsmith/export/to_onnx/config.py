"""What an ONNX export does, as values: the task registry, the int8 scheme and the export's own config.

Torch-free: the CLI builds its ``export onnx`` flags and choices from these fields and tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from weightsmith.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Task:
    """One exportable task: the transformers auto class built and the output the graph returns."""

    name: str
    auto: str  # transformers auto class, e.g. "AutoModelForCausalLM"
    output: str  # the model output exported, e.g. "logits"
    also: tuple[str, ...] = ()  # further outputs, in the graph's order after ``output``
    with_past: bool = False  # a decoder graph with its KV cache as inputs and outputs
    # "text": input_ids, attention_mask (…); "pixels": pixel_values (batch, channels, h, w); "text+pixels": both (a
    # dual encoder); "features": a speech encoder's input_features (batch, mel bins, frames)
    inputs: str = "text"
    seq2seq: bool = False  # three graphs under optimum's names: encoder, decoder, decoder with past

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.output, *self.also)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(name="feature-extraction", auto="AutoModel", output="last_hidden_state"),
        Task(name="text-classification", auto="AutoModelForSequenceClassification", output="logits"),
        Task(name="causal-lm", auto="AutoModelForCausalLM", output="logits"),
        Task(name="text-generation-with-past", auto="AutoModelForCausalLM", output="logits", with_past=True),
        Task(name="masked-lm", auto="AutoModelForMaskedLM", output="logits"),
        Task(name="token-classification", auto="AutoModelForTokenClassification", output="logits"),
        Task(name="image-classification", auto="AutoModelForImageClassification", output="logits", inputs="pixels"),
        Task(
            name="zero-shot-image-classification",
            auto="AutoModelForZeroShotImageClassification",
            output="logits_per_image",
            also=("logits_per_text", "text_embeds", "image_embeds"),
            inputs="text+pixels",
        ),
        Task(
            name="question-answering", auto="AutoModelForQuestionAnswering", output="start_logits", also=("end_logits",)
        ),
        Task(name="text2text-generation", auto="AutoModelForSeq2SeqLM", output="logits", with_past=True, seq2seq=True),
        Task(
            name="automatic-speech-recognition",
            auto="AutoModelForSpeechSeq2Seq",
            output="logits",
            with_past=True,
            inputs="features",
            seq2seq=True,
        ),
    )
}

# The head class's name ending → the task inferred when none is given. Causal LMs get the cached graph, as
# optimum infers ``text-generation-with-past``; ``causal-lm`` (no cache) is there on request.
INFERRED: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "text-generation-with-past"),
    ("LMHeadModel", "text-generation-with-past"),
    ("ForMaskedLM", "masked-lm"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForImageClassification", "image-classification"),
    ("WhisperForConditionalGeneration", "automatic-speech-recognition"),
    ("T5ForConditionalGeneration", "text2text-generation"),  # T5, mT5, UMT5, LongT5
    ("BartForConditionalGeneration", "text2text-generation"),  # BART, mBART
    ("ForQuestionAnswering", "question-answering"),
    ("CLIPModel", "zero-shot-image-classification"),
    ("SiglipModel", "zero-shot-image-classification"),
    ("Model", "feature-extraction"),
)


def infer_task(config: dict[str, Any], where: str) -> str:
    """The task of a checkpoint's ``architectures`` (its head class), as ``INFERRED`` maps them."""
    architectures = config.get("architectures") or []
    for arch in architectures:
        for ending, task in INFERRED:
            if arch.endswith(ending):
                return task
    named = ", ".join(architectures) or f"model_type {config.get('model_type', '?')!r} without architectures"
    raise ConfigError(
        f"{where}: no export task for {named}; give `task`, one of {', '.join(TASKS)} "
        f"(inferred for {', '.join('*' + e for e, _ in INFERRED)})"
    )


INT8_WEIGHTS = ("int8", "uint8", "int8-vnni")  # Int8Dynamic's weight codes


@dataclass(frozen=True, kw_only=True)
class Int8Dynamic:
    """onnxruntime dynamic quantization: int8 weights, activation scales computed per call (MatMulInteger)."""

    per_channel: bool = True  # one scale per output channel: per tensor loses ~2× the accuracy on MiniLM
    # Mean per-position cosine of int8 vs float outputs below which the int8 file is refused. 0.98, not 0.99: per
    # token is stricter than per sentence (MiniLM on real text: 0.991 per token, 0.993 mean-pooled).
    min_cosine: float = 0.98
    # The weight codes, a trade of speed for accuracy (measured in docs/export.md):
    # "int8": signed codes kept to 7 bits (onnxruntime's reduce_range) for the u8×s8 kernels: the same accuracy on
    #   every CPU, and the int8 speed-up on CPUs with VNNI.
    # "uint8": asymmetric 8-bit codes for the u8×u8 kernels: about half int8's error, on every CPU, but no faster than
    #   float32 on a VNNI CPU (no VNNI instruction takes u8×u8).
    # "int8-vnni": full 8-bit signed codes, int8's speed with nearly uint8's accuracy, for x86 CPUs with VNNI only:
    #   the u8×s8 kernels of those without (AVX2, AVX-512 before VNNI) saturate 16-bit sums of pairs of full codes,
    #   so the same file loses accuracy there.
    weights: str = "int8"

    def __post_init__(self) -> None:
        if not (isinstance(self.min_cosine, (int, float)) and -1 <= self.min_cosine <= 1):
            raise ConfigError(f"min_cosine {self.min_cosine!r}: expected a number in [-1, 1]")
        if self.weights not in INT8_WEIGHTS:
            raise ConfigError(f"weights {self.weights!r}: expected one of {', '.join(INT8_WEIGHTS)}")


QUANTIZE: dict[str, type[Int8Dynamic]] = {"int8": Int8Dynamic}

# opsets the exporter writes (torch 2.13's dynamo exporter: 18 to 23)
OPSETS = range(18, 24)


@dataclass(frozen=True, kw_only=True)
class OnnxExport:
    """An ONNX export: ``OnnxExport(task="causal-lm", quantize=Int8Dynamic(), benchmark=True)``.

    ``quantize`` also takes a name of ``QUANTIZE`` ("int8"), turned into its scheme with default fields.
    """

    # None: inferred from the checkpoint's architectures (INFERRED) when the export runs
    task: str | None = field(
        default=None, metadata={"help": "which head and output to export (default: inferred)", "choices": TASKS}
    )
    opset: int | None = field(
        default=None, metadata={"help": "ONNX opset (default 20; 17 for cached decoders and encoder-decoders)"}
    )
    quantize: Int8Dynamic | None = field(
        default=None, metadata={"help": "onnxruntime dynamic int8 quantization, per channel", "choices": QUANTIZE}
    )
    optimize: bool = field(default=False, metadata={"help": "save onnxruntime's graph optimizations into the file"})
    # 1e-4: float32 graphs match PyTorch to ~1e-6 on tiny models and ~2e-5 on MiniLM; reordered sums, not bugs
    atol: float = field(default=1e-4, metadata={"help": "max |Δ| allowed between ORT and PyTorch"})
    benchmark: bool = field(
        default=False, metadata={"help": "also time ORT vs PyTorch eager at 8×128, one thread (median of 3)"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.quantize, str):
            if self.quantize not in QUANTIZE:
                raise ConfigError(f"quantize {self.quantize!r}: expected one of {', '.join(QUANTIZE)}")
            object.__setattr__(self, "quantize", QUANTIZE[self.quantize]())
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.quantize is not None and not isinstance(self.quantize, Int8Dynamic):
            raise ConfigError(f"quantize {self.quantize!r}: expected one of {', '.join(QUANTIZE)}")
        if self.opset is not None and not (isinstance(self.opset, int) and self.opset in OPSETS):
            raise ConfigError(f"opset {self.opset!r}: the exporter writes opsets {OPSETS[0]} to {OPSETS[-1]}")
        if not (isinstance(self.atol, (int, float)) and self.atol > 0):
            raise ConfigError(f"atol {self.atol!r}: expected a positive number")

    @property
    def quantize_name(self) -> str | None:
        return next((n for n, kind in QUANTIZE.items() if isinstance(self.quantize, kind)), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the scheme by name and its fields), as provenance records them."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.quantize is not None:
            values["quantize"] = {
                "scheme": self.quantize_name,
                **{f.name: getattr(self.quantize, f.name) for f in fields(self.quantize)},
            }
        return values


def make_export(config: OnnxExport | dict | None = None, **options: Any) -> OnnxExport:
    """An ``OnnxExport`` from a value, its dict (recipes, JSON) or keyword options; an option it does not have is
    refused with the ones it has."""
    if isinstance(config, OnnxExport):
        if options:
            raise ConfigError(f"options {', '.join(sorted(options))}: give them in the config value, not beside it")
        return config
    options = {**(config or {}), **options}
    valid = [f.name for f in fields(OnnxExport)]
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise ConfigError(f"unknown ONNX export option(s) {', '.join(unknown)} (expected {', '.join(valid)})")
    return OnnxExport(**options)
