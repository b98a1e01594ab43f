"""Which tensors a quantization touches: the 2-D weights of Linear layers, minus the ignored modules.

Only tensor names and shapes are available (no model graph), so a weight is a Linear weight when it is a 2-D float
``<m>.weight`` whose module is not an embedding and not a GPT-2-style Conv1D. Everything else (embeddings, norms,
biases, output heads) stays float.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from weightsmith import architecture
from weightsmith.checkpoint import TensorSource
from weightsmith.errors import ConfigError

# Output heads stay float by default (transformers keeps the output embedding out of bnb quantization and
# llm-compressor's recipes ignore lm_head): lm_head of causal LMs, score/classifier/qa_outputs of task heads.
DEFAULT_IGNORE = architecture.HEADS


def matches(module: str, pattern: str) -> bool:
    """transformers' rule for a skip pattern: a regex matched from the start up to a module boundary
    ("layers.1" matches "layers.1.mlp", not "layers.11.mlp"), or a plain suffix ("fc1")."""
    try:
        hit = re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module) is not None
    except re.error:
        hit = False
    return hit or module.endswith(pattern)


@dataclass
class Plan:
    targets: list[str]  # weight names to quantize, in storage order
    kept: list[str]  # modules whose 2-D weight stays float (listed as ignored in the output's config)
    notes: list[str]
    per_expert: bool = False  # MoE expert weights stored one expert at a time (transformers fuses them on load)


def plan(ckpt: TensorSource, ignore: Sequence[str] | None) -> Plan:
    """The weights to quantize. ``ignore`` = None means DEFAULT_IGNORE; a user pattern that matches nothing is an
    error (a typo would silently quantize the module the user meant to keep)."""
    patterns = list(DEFAULT_IGNORE if ignore is None else ignore)
    # transformers' own model class is the truth about what its loader will quantize: which modules are nn.Linear,
    # which it keeps in float32, which heads it ties (and builds although the file lacks them)
    facts = architecture.model_facts(ckpt.config, ckpt.path)
    keep_fp32 = facts.keep_fp32 if facts is not None else ()
    # the facts name modules as the model has them in memory; a file may store some under older names
    in_memory = {
        c.removesuffix(".weight"): m.removesuffix(".weight") for m, c in (facts.saved if facts else {}).items()
    }
    targets, kept, used, conv1d = [], [], set(), False
    for name in ckpt:
        info = ckpt.info(name)
        if not name.endswith(".weight") or len(info.shape) != 2 or not info.dtype.is_floating_point:
            continue
        module = name.removesuffix(".weight")
        own = in_memory.get(module, module)  # its name in memory
        hits = [p for p in patterns if matches(module, p) or matches(own, p)]
        used.update(hits)
        # Conv1D ([in, out], GPT-2 style) is not nn.Linear: neither format targets it
        conv1d = conv1d or architecture.is_conv1d(ckpt.config, name)
        if facts is not None and own in facts.modules:  # a module the model class has
            linear = own in facts.linear
        else:  # converted on load (fused experts), or no model class: judged by name
            linear = architecture.is_linear_weight(ckpt.config, name, info.shape, True)
        if hits or not linear or any(matches(module, p) or matches(own, p) for p in keep_fp32):
            kept.append(own)  # the loader skips modules by their names in memory
        else:
            targets.append(name)
    if ignore is not None:
        unused = [p for p in patterns if p not in used]
        if unused:
            raise ConfigError(f"{ckpt.path}: `ignore` pattern(s) {', '.join(map(repr, unused))} match no 2-D weight")
    notes = []
    if conv1d:
        notes.append("Conv1D weights ([in, out], GPT-2 style) are not nn.Linear and stay float")
    if facts is not None:
        # the loader builds these as Linear whatever the file holds: heads tied to an embedding (absent from the
        # file) and the output head (stored under an older name, e.g. GPT-NeoX's embed_out); they stay float
        quantized = {in_memory.get(m, m) for m in (t.removesuffix(".weight") for t in targets)}
        heads = [t.removesuffix(".weight") for t in facts.tied] + ([facts.output_head] if facts.output_head else [])
        kept += [m for m in heads if m in facts.linear and m not in quantized and m not in kept]
        if keep_fp32:
            notes.append(f"modules transformers keeps in float32 stay float: {', '.join(keep_fp32)}")
    else:
        # an output head tied to the embedding is not stored, but the loader builds it as a Linear: keep it float
        tied = [head.removesuffix(".weight") for head in ckpt.tied_weights]
        kept += [m for m in tied if m not in kept]
    per_expert = any(architecture.is_per_expert(m) for m in kept)
    return Plan(targets, kept, notes, per_expert)
