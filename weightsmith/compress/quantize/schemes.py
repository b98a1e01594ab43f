"""Quantization schemes as values: frozen, keyword-only configs that validate themselves and round-trip to JSON.

``quantize(src, out, scheme=NF4(double_quant=True))`` looks the config's type up in ``REGISTRY`` to find the code
that quantizes a tensor, writes the format's ``quantization_config`` and reads the format back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from weightsmith.errors import ConfigError

# bitsandbytes' CPU and CUDA kernels accept these 4-bit block sizes.
_BNB_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class Int8:
    """Symmetric int8 weights in the compressed-tensors layout.

    W8A8 (default): int8 weights, activations quantized per token at run time ("int-quantized" format), the layout
    vLLM and transformers load as a dynamic int8 model. ``weight_only=True``: W8A16, int8 weights packed four to an
    int32 ("pack-quantized"), activations stay float. ``group_size``: one scale per run of ``group_size`` input
    columns instead of one per output row.
    """

    name: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8
    # None = one scale per output channel: the scheme vLLM's int8 kernels are tuned for, and accurate enough for
    # int8 (per-group scales matter at 4 bits, rarely at 8).
    group_size: int | None = None
    # False = W8A8 dynamic, the default: int8 matmuls where the runtime has them.
    weight_only: bool = False

    def __post_init__(self) -> None:
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ConfigError(f"int8: group_size {self.group_size!r} must be a positive integer")
        if not isinstance(self.weight_only, bool):
            raise ConfigError(f"int8: weight_only {self.weight_only!r} must be true or false")

    @property
    def label(self) -> str:
        kind = "W8A16" if self.weight_only else "W8A8"
        return f"int8 {kind} " + (f"group {self.group_size}" if self.group_size else "per-channel")

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.name, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class NF4:
    """4-bit NormalFloat in blocks (Dettmers et al. 2023, "QLoRA"), computed by bitsandbytes' ``quantize_4bit`` and
    stored as transformers stores a bitsandbytes 4-bit model."""

    name: ClassVar[str] = "nf4"
    bits: ClassVar[int] = 4
    # 64: QLoRA's block size and transformers' default; bitsandbytes' "blocksize".
    group_size: int = 64
    # False: transformers' default; True saves another ~0.4 bit per weight (QLoRA's double quantization).
    double_quant: bool = False
    # float32: what transformers writes when none is given; the dtype Linear4bit computes in at run time.
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.group_size not in _BNB_BLOCKSIZES or isinstance(self.group_size, bool):
            raise ConfigError(
                f"nf4: group_size {self.group_size!r} must be one of "
                f"{', '.join(map(str, _BNB_BLOCKSIZES))} (bitsandbytes block sizes)"
            )
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"nf4: double_quant {self.double_quant!r} must be true or false")
        dtype = str(self.compute_dtype).removeprefix("torch.")
        aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
        dtype = aliases.get(dtype, dtype)
        if dtype not in _FLOAT_DTYPES:
            raise ConfigError(f"nf4: compute_dtype {self.compute_dtype!r} must be one of {', '.join(_FLOAT_DTYPES)}")
        object.__setattr__(self, "compute_dtype", dtype)

    @property
    def label(self) -> str:
        return f"nf4 block {self.group_size}" + (" + double quant" if self.double_quant else "")

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.name, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class GPTQ:
    """Calibrated int4 rounding (Frantar et al. 2023, "GPTQ"): each Linear's rounding errors fed back into the
    columns not yet rounded, weighted by the inverse Hessian H = 2XXᵀ of its calibration inputs. The calibration text
    runs through the model one layer at a time (``gptq_driver.py``); the output layout is plain int4's."""

    # A UTF-8 text file, one sample per non-empty line, tokenised with the checkpoint's tokenizer.
    calibration: str
    # 0.01 · mean(diag H) added to H's diagonal: GPTQ's and llm-compressor's default, enough to keep the Cholesky
    # factorisation stable when a few inputs barely vary.
    damp: float = 0.01
    # False: columns in their stored order. True: the columns with the largest H_jj first (the paper's act-order),
    # with each group's scale fixed up front from its original columns, so the layout needs no column permutation.
    act_order: bool = False
    # 128: the paper's lazy-batch width; the result does not depend on it beyond float rounding.
    block_size: int = 128
    # 128 lines of up to 512 tokens: about 65k tokens, enough for stable Hessians of layers a few thousand wide while
    # keeping the CPU time of the calibration passes in minutes.
    samples: int = 128
    seq_len: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "calibration", str(self.calibration))
        if not self.calibration:
            raise ConfigError("gptq: `calibration` must name a text file")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise ConfigError(f"gptq: `damp` {self.damp!r} must be a number in [0, 1)")
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"gptq: `act_order` {self.act_order!r} must be true or false")
        for field in ("block_size", "samples", "seq_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"gptq: `{field}` {value!r} must be a positive integer")


@dataclass(frozen=True, kw_only=True)
class Int4:
    """int4 weights, activations float (W4A16), round-to-nearest per group, in compressed-tensors' "pack-quantized"
    layout: eight 4-bit codes per int32. The format GPTQ checkpoints use and vLLM's Marlin/Machete kernels run."""

    name: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4
    # 128: the group size of llm-compressor's W4A16 preset and most GPTQ checkpoints (one scale per 128 inputs).
    # None = one scale per output channel.
    group_size: int | None = 128
    # False = symmetric codes in [-8, 7], no zero point (the preset's choice; kernels are fastest without one).
    # True adds a per-group zero point, which fits skewed groups better.
    asymmetric: bool = False
    # None = round-to-nearest, data-free and streamed; a GPTQ value calibrates the rounding (same stored layout).
    gptq: GPTQ | None = None

    def __post_init__(self) -> None:
        if isinstance(self.gptq, dict):  # from JSON or a recipe
            object.__setattr__(self, "gptq", GPTQ(**self.gptq))
        if self.gptq is not None and not isinstance(self.gptq, GPTQ):
            raise ConfigError(f"int4: gptq {self.gptq!r} must be a GPTQ config")
        if self.group_size == 0 and not isinstance(self.group_size, bool):  # 0 = per channel (a CLI can say it)
            object.__setattr__(self, "group_size", None)
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ConfigError(f"int4: group_size {self.group_size!r} must be a positive integer")
        if not isinstance(self.asymmetric, bool):
            raise ConfigError(f"int4: asymmetric {self.asymmetric!r} must be true or false")

    @property
    def label(self) -> str:
        kind = "asymmetric" if self.asymmetric else "symmetric"
        label = f"int4 W4A16 {kind} " + (f"group {self.group_size}" if self.group_size else "per-channel")
        return label + (" GPTQ" if self.gptq is not None else "")

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.name, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class FP8:
    """FP8 (e4m3) weights with one scale per output channel, activations quantized to FP8 per token at run time
    (W8A8 dynamic), in compressed-tensors' "float-quantized" layout: llm-compressor's FP8_DYNAMIC preset, which vLLM
    runs on Hopper/Ada GPUs. Data-free: no calibration."""

    name: ClassVar[str] = "fp8"
    bits: ClassVar[int] = 8
    # no options: per-channel weight scales and per-token dynamic activations are what the FP8 kernels expect
    group_size: ClassVar[None] = None

    @property
    def label(self) -> str:
        return "fp8 e4m3 W8A8 per-channel, dynamic per-token activations"

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.name}


Scheme = Int8 | NF4 | Int4 | FP8
SCHEMES: dict[str, type] = {cls.name: cls for cls in (Int8, NF4, Int4, FP8)}
# Options of a calibrated rounding, given beside a scheme's own (``make_scheme("int4", gptq=True, calibration=…)``).
GPTQ_OPTIONS = tuple(f.name for f in fields(GPTQ))


def make_scheme(scheme: str | Scheme | dict, **options: Any) -> Scheme:
    """A scheme from its name and options (``make_scheme("nf4", double_quant=True)``), a config, or its dict.

    Options left at None/False are dropped, so a CLI can pass every flag; an option the scheme does not have is
    refused with the scheme's valid options.
    """
    if isinstance(scheme, dict):
        options = {**{k: v for k, v in scheme.items() if k != "scheme"}, **options}
        scheme = scheme.get("scheme", "")
    options = _gather_gptq({k: v for k, v in options.items() if v is not None and v is not False})
    if not isinstance(scheme, (str, dict)):  # already a config value
        if options:
            raise ConfigError(f"{scheme.name}: pass options inside the config, not beside it ({', '.join(options)})")
        return scheme
    cls: Any = SCHEMES.get(str(scheme).lower())
    if cls is None:
        raise ConfigError(f"unknown quantization scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ConfigError(f"{cls.name}: option(s) {', '.join(unknown)} do not apply (valid: {', '.join(valid)})")
    return cls(**options)


def _gather_gptq(options: dict[str, Any]) -> dict[str, Any]:
    """``gptq=True`` with its options beside it (a CLI's flat flags) → ``gptq=GPTQ(...)``."""
    loose = {k: options.pop(k) for k in GPTQ_OPTIONS if k in options}
    if options.get("gptq") is True:
        if "calibration" not in loose:
            raise ConfigError("gptq needs `calibration`: a text file run through the model layer by layer")
        options["gptq"] = GPTQ(**loose)
    elif loose:
        raise ConfigError(f"{', '.join(f'`{k}`' for k in loose)}: only with `gptq` (calibrated int4 rounding)")
    return options
