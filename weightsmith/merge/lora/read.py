"""Reading PEFT LoRA adapters: which base tensors an adapter changes and how, from its config and tensor names.

Nothing here reads tensor data except ``check_finite``; PEFT itself is never imported. Key layout (peft ≥ 0.7):
``base_model.model.<module>.lora_A.weight`` ``[r, in]``, ``.lora_B.weight`` ``[out, r]``, ``.lora_B.bias``
``[out]`` (lora_bias), ``.lora_embedding_A`` ``[r, num]``, ``.lora_embedding_B`` ``[dim, r]``,
``.lora_magnitude_vector`` ``[out]`` (DoRA); any other key is a tensor that replaces the base tensor of the same
name (``modules_to_save``, trained biases, ``<module>.base_layer.<param>``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass, field

from weightsmith.checkpoint import Checkpoint, TensorSource
from weightsmith.errors import ConfigError, IncompatibleError, NumericalError
from weightsmith.merge.lora.math import lora_scaling
from weightsmith.numerics import all_finite

PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector)$"
)
# init_lora_weights values that change the base weights at initialisation: the adapter alone is not ΔW.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Config fields that, when set, make an adapter something other than a foldable W + s·B·A (or DoRA).
_UNFOLDABLE_FIELDS = {
    "layer_replication": "layer_replication (the adapter duplicates base layers)",
    "alora_invocation_tokens": "aLoRA (activated only after invocation tokens)",
    "target_parameters": "target_parameters (LoRA on raw nn.Parameters)",
    "trainable_token_indices": "trainable_token_indices (trainable tokens)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}


@dataclass
class LoraModule:
    """One adapted module: the adapter tensor names and the scaling s = α/r (or α/√r)."""

    module: str  # base module path, e.g. "model.layers.0.self_attn.q_proj"
    a: str | None = None
    b: str | None = None
    bias: str | None = None  # lora_B.bias: b' = b + s·bias
    magnitude: str | None = None  # DoRA
    embedding: bool = False
    scaling: float = 1.0
    r: int = 0
    # AdaLoRA: (α, d), ΔW = (B·A)·α / d with α and d applied one after the other as PEFT rounds them; ``scaling``
    # = α/d serves every other use (weighted folds, combine, resize)
    split_scale: tuple[float, float] | None = None

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"

    @property
    def factors(self) -> tuple[str, str]:
        """The lora_A and lora_B tensor names (the reader keeps only modules that have both)."""
        assert self.a is not None and self.b is not None
        return self.a, self.b


@dataclass
class Adapter:
    """A parsed PEFT LoRA adapter: per-module LoRA factors plus whole tensors that replace base tensors."""

    ckpt: TensorSource
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)  # base weight name -> module
    replacements: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter tensor name
    updates: dict = field(default_factory=dict)  # base weight name -> peft_types.Update (LoHa, LoKr, IA³, OFT)
    peft_type: str = "LORA"

    @property
    def path(self):
        return self.ckpt.path

    @property
    def dora(self) -> bool:
        return any(m.magnitude for m in self.modules.values())


def pattern_value(patterns: dict | None, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key (in dict order) with
    ``re.match(rf"(.*\\.)?({key})$", module)`` gives the value; no match gives ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(source: TensorSource | str | os.PathLike, base: TensorSource | None = None) -> Adapter:
    """Open and validate a PEFT adapter directory (refusing what cannot be folded, with one clear line).

    LORA adapters are read here; the other types by ``peft_types.read_typed`` (VeRA needs ``base`` for its layers'
    sizes)."""
    ckpt = source if isinstance(source, TensorSource) else Checkpoint(source)
    cfg = ckpt.adapter_config
    if cfg is None:
        raise IncompatibleError(f"{ckpt.path}: not a PEFT adapter (no adapter_config.json)")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        from weightsmith.merge.lora.peft_types import read_typed

        return read_typed(ckpt, cfg, base)
    _check_config(ckpt.path, cfg)
    adapter = Adapter(ckpt, cfg)
    unprefixed = [n for n in ckpt if not n.startswith(PREFIX)]
    if unprefixed:
        raise IncompatibleError(
            f"{ckpt.path}: adapter tensor {unprefixed[0]!r} lacks the {PREFIX!r} prefix (not a PEFT LoRA adapter?)"
        )
    duplicates: dict[str, str] = {}
    for name in ckpt:
        key = name[len(PREFIX) :]
        match = _LORA_KEY.match(key)
        if match is None:
            if re.search(r"\.lora_|\.token_adapter\.", key):
                raise IncompatibleError(f"{ckpt.path}: tensor {name!r} is an adapter part weightsmith cannot fold")
            add_replacement(adapter, key, name, duplicates)
            continue
        module, part = match["module"], match["part"]
        mod = adapter.modules.setdefault(f"{module}.weight", LoraModule(module))
        if part in ("lora_A.weight", "lora_embedding_A"):
            mod.a, mod.embedding = name, part == "lora_embedding_A"
        elif part in ("lora_B.weight", "lora_embedding_B"):
            mod.b = name
        elif part == "lora_B.bias":
            mod.bias = name
        else:
            mod.magnitude = name
    for key, name in duplicates.items():
        adapter.replacements.setdefault(key, name)
    for mod in adapter.modules.values():
        if mod.a is None or mod.b is None:
            raise IncompatibleError(f"{ckpt.path}: module {mod.module!r} has only one of lora_A/lora_B")
        shape_a = ckpt.info(mod.a).shape
        if len(shape_a) < 2 or shape_a[0] == 0:
            raise IncompatibleError(
                f"{ckpt.path}: {mod.a!r} has shape {list(shape_a)}; lora_A must be [r, ...] with r at least 1"
            )
        mod.r = shape_a[0]
        r_cfg = pattern_value(cfg.get("rank_pattern"), mod.module, cfg.get("r"))
        if r_cfg is not None and int(r_cfg) != mod.r:
            raise IncompatibleError(
                f"{ckpt.path}: module {mod.module!r} has rank {mod.r} but the config says {r_cfg} (rank_pattern/r)"
            )
        alpha = pattern_value(cfg.get("alpha_pattern"), mod.module, cfg.get("lora_alpha", 8))
        mod.scaling = lora_scaling(float(alpha), mod.r, bool(cfg.get("use_rslora")))
        if cfg.get("use_dora") and mod.magnitude is None:
            raise IncompatibleError(f"{ckpt.path}: use_dora is set but {mod.module!r} has no lora_magnitude_vector")
    odd = [n for n in ckpt if not ckpt.info(n).dtype.is_floating_point]
    if odd:
        raise IncompatibleError(
            f"{ckpt.path}: adapter tensor {odd[0]!r} is {ckpt.info(odd[0]).dtype}, not a floating-point number"
        )
    if not adapter.modules and not adapter.replacements:
        raise IncompatibleError(f"{ckpt.path}: adapter holds no tensors")
    return adapter


def _check_types(path, cfg: dict) -> None:
    """The fields weightsmith computes with, checked for type and range (the rest of PEFT's fields are ignored)."""
    where = f"{path}/adapter_config.json"

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    r = cfg.get("r")
    if "r" in cfg and not (type(r) is int and r >= 1):
        raise ConfigError(f"{where}: r must be a positive integer, not {str(r)[:40]!r}")
    if "lora_alpha" in cfg and not number(cfg["lora_alpha"]):
        raise ConfigError(f"{where}: lora_alpha must be a number, not {str(cfg['lora_alpha'])[:40]!r}")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise ConfigError(f"{where}: {key} must be true or false, not {str(cfg[key])[:40]!r}")
    for key, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = cfg.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise ConfigError(f"{where}: {key} must map module patterns to values")
        for pattern, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({pattern})$")
            except (re.error, RecursionError, OverflowError) as exc:
                raise ConfigError(f"{where}: {key} pattern {pattern[:60]!r} is not a valid regex ({exc})") from None
            ok = (type(value) is int and value >= 1) if positive_int else number(value)
            if not ok:
                raise ConfigError(
                    f"{where}: {key}[{pattern[:60]!r}] must be a {'positive integer' if positive_int else 'number'}"
                )


def add_replacement(adapter: Adapter, key: str, name: str, duplicates: dict[str, str]) -> None:
    """A tensor that is no adapter part replaces the base tensor of its name (``key``, prefix stripped)."""
    if ".original_module." in key:  # with bias="all" PEFT also saves the wrapper's untouched base copy
        return
    if ".modules_to_save." in key:  # ... and a duplicate of the trained copy under the wrapper's name
        duplicates[key.replace(".modules_to_save.", ".")] = name
        return
    adapter.replacements[key.replace(".base_layer.", ".")] = name


def _check_config(path, cfg: dict) -> None:
    _check_types(path, cfg)
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise IncompatibleError(
            f"{path}: init_lora_weights={init!r} changed the base weights at initialisation; "
            f"convert the adapter first (PEFT: save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=...))"
        )
    if cfg.get("loftq_config"):
        raise IncompatibleError(f"{path}: a LoftQ-initialised adapter needs its own quantized base; convert it first")
    for key, what in _UNFOLDABLE_FIELDS.items():
        if cfg.get(key):
            raise IncompatibleError(f"{path}: {what} cannot be folded into a plain checkpoint")


def to_checkpoint_names(adapter: Adapter, base: Container[str], saved: Mapping[str, str]) -> int:
    """Rename the adapter's targets that ``base`` lacks to the names a checkpoint stores them under.

    A PEFT adapter names modules as the model has them in memory; transformers 5 saves some families under older
    names (``saved``: ``architecture.checkpoint_names``, {name in memory: name in the checkpoint}). A target is
    renamed only when ``base`` lacks its own name and ``saved`` knows it; the rest are left for the fold to report.
    Returns how many targets were renamed."""

    def renamed(name: str) -> str | None:
        new = saved.get(name)
        return new if new is not None and name not in base and new in base else None

    count = 0
    for name, mod in list(adapter.modules.items()):
        new = renamed(name)
        if new is not None:
            del adapter.modules[name]
            mod.module = new.removesuffix(".weight")
            adapter.modules[new] = mod
            count += 1
    for name, tensor in list(adapter.replacements.items()):
        new = renamed(name)
        if new is not None:
            del adapter.replacements[name]
            adapter.replacements[new] = tensor
            count += 1
    for name, upd in list(adapter.updates.items()):
        new = renamed(name)
        if new is not None:
            del adapter.updates[name]
            upd.module = new.removesuffix(".weight")
            adapter.updates[new] = upd
            count += 1
    return count


def check_finite(adapter: Adapter) -> None:
    """Refuse NaN/Inf anywhere in the adapter (reads each adapter tensor once)."""
    for name in adapter.ckpt:
        t = adapter.ckpt[name]
        if not all_finite(t):
            raise NumericalError(f"{adapter.path}: adapter tensor {name!r} contains NaN or Inf")
