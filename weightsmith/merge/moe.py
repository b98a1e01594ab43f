"""Mixture-of-experts merges as mergekit-moe 0.1.5 builds them: dense Llama/Mistral models in, a Mixtral model out.

The base model gives everything but the MLPs (embeddings, attention, norms, head); each expert model's MLP of
layer i becomes expert j of layer i; the routers come from the experts' prompts (``gate_mode: cheap_embed``) or at
random (``random``, ``uniform_random``). The config is mergekit-moe's YAML:

    base_model: org/base
    gate_mode: cheap_embed
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - {source_model: org/chat, positive_prompts: ["Hello, how are you?"]}
      - {source_model: org/math, positive_prompts: ["Solve 2x + 3 = 7"], negative_prompts: ["a poem"]}

Everything is checked from configs and safetensors headers before a weight is read; then the output is streamed:
the base's tensors are copied (byte for byte when the dtype is kept), and each layer's experts are stacked into
transformers' fused ``experts.gate_up_proj`` (experts, 2·intermediate, hidden) and ``experts.down_proj``
(experts, hidden, intermediate), so the peak is one layer's experts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from weightsmith.errors import ConfigError
from weightsmith.yamltext import load_mapping, parse_mapping

# mergekit-moe's gate modes; the hidden ones run the base model on the prompts (``merge.hidden``)
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")  # the modes that read the prompts
DENSE_TYPES = ("llama", "mistral")  # the model types a Mixtral block can take the MLP of (mergekit's rule)
_TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture")
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")


@dataclass(frozen=True, kw_only=True)
class Expert:
    """One expert: the model whose MLPs it takes, the prompts its router row is made from, and mergekit-moe's
    optional Gaussian noise (σ = ``noise_scale``) on its MLP weights and scale of its ``down_proj``."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A validated mergekit-moe config (Mixtral output)."""

    base_model: str
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"  # mergekit-moe's default
    dtype: str | None = None  # None: the base's config dtype, else each tensor's stored dtype
    experts_per_token: int = 2  # mergekit-moe's default: Mixtral's top-2 routing
    parameters: Mapping[str, Any] = field(default_factory=dict)  # the YAML as given, for provenance

    def __post_init__(self) -> None:
        if self.gate_mode not in GATE_MODES:
            raise ConfigError(f"gate_mode {self.gate_mode!r} is not supported: use one of {', '.join(GATE_MODES)}")
        if not self.experts:
            raise ConfigError("experts: give at least one expert")
        if not 1 <= self.experts_per_token <= len(self.experts):
            raise ConfigError(
                f"experts_per_token {self.experts_per_token}: must be between 1 and the number of experts "
                f"({len(self.experts)})"
            )
        if self.gate_mode not in PROMPT_MODES:
            return
        for i, e in enumerate(self.experts):
            if not e.positive_prompts:
                raise ConfigError(f"experts[{i}]: gate_mode {self.gate_mode} needs positive_prompts for every expert")
        prompts = {(e.positive_prompts, e.negative_prompts) for e in self.experts}
        if len(self.experts) > 1 and len(prompts) == 1:
            raise ConfigError(
                "experts: every expert has the same prompts, so the router cannot tell them apart: give each "
                "expert positive_prompts for what it should receive"
            )


def is_moe_config(source: str | os.PathLike | Mapping) -> bool:
    """Whether ``source`` (a YAML file, YAML text or a dict) is a mergekit-moe config (it has ``experts``)."""
    if isinstance(source, Mapping):
        return "experts" in source
    text = str(source)
    if "\n" in text or text.lstrip().startswith("{"):
        return "experts" in parse_mapping(text, "config", "base_model and experts")
    if not os.path.isfile(text):
        return False
    return "experts" in load_mapping(text, "config", "base_model and experts")[0]


def load_moe_config(source: str | os.PathLike | Mapping) -> MoEConfig:
    """Read and validate a mergekit-moe config (no files opened)."""
    expected = "base_model and experts"
    text = source if isinstance(source, str) else None
    if text is not None and ("\n" in text or text.lstrip().startswith("{")):
        raw, where = parse_mapping(text, "config", expected), "config"
    else:
        raw, where = load_mapping(source, "config", expected)
    try:
        return _validate(raw, where)
    except ConfigError as exc:
        if str(exc).startswith(where):
            raise
        raise ConfigError(f"{where}: {exc}") from None


def _validate(raw: Mapping[str, Any], where: str) -> MoEConfig:
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (expected one of {', '.join(_TOP_KEYS)})")
    if raw.get("shared_experts"):
        raise ConfigError(f"{where}: shared_experts (a Qwen2-MoE or DeepSeek output) is not supported: remove it")
    arch = raw.get("architecture")
    if arch is not None and not "mixtral".startswith(str(arch).lower()):
        raise ConfigError(f"{where}: architecture {arch!r} is not supported: the output is Mixtral (omit the key)")
    base = raw.get("base_model")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: base_model must be a model path or Hub id, got {base!r}")
    experts = raw.get("experts")
    if not isinstance(experts, list):
        raise ConfigError(f"{where}: experts must be a list of {{source_model, positive_prompts, …}}")
    per_token = raw.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int):
        raise ConfigError(f"{where}: experts_per_token must be an integer, got {per_token!r}")
    dtype = raw.get("dtype")
    if dtype is not None:
        from weightsmith.units import parse_dtype

        parse_dtype(dtype)
    return MoEConfig(
        base_model=base,
        experts=tuple(_expert(e, f"{where}: experts[{i}]") for i, e in enumerate(experts)),
        gate_mode=str(raw.get("gate_mode", "hidden")),
        dtype=dtype,
        experts_per_token=per_token,
        parameters=dict(raw),
    )


def _expert(entry: Any, where: str) -> Expert:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with source_model, got {entry!r}")
    for key in entry:
        if key not in _EXPERT_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (expected one of {', '.join(_EXPERT_KEYS)})")
    model = entry.get("source_model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: source_model must be a model path or Hub id, got {model!r}")

    def prompts(key: str) -> tuple[str, ...]:
        value = entry.get(key) or []
        if isinstance(value, str) or not all(isinstance(p, str) for p in value):
            raise ConfigError(f"{where}: {key} must be a list of strings")
        return tuple(value)

    def scale(key: str) -> float | None:
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return None if value is None else float(value)

    return Expert(
        source_model=model,
        positive_prompts=prompts("positive_prompts"),
        negative_prompts=prompts("negative_prompts"),
        noise_scale=scale("noise_scale"),
        residual_scale=scale("residual_scale"),
    )
