"""``extract``: a PEFT LoRA adapter from a fine-tune, by truncated SVD of each changed linear weight.

Per module: ΔW = W_tuned − W_base seen as ``[out, in]`` (GPT-2 Conv1D transposed), ΔW ≈ B·A with B = U_k·√S_k and
A = √S_k·V_kᵀ (Eckart–Young: the best rank-k approximation in Frobenius norm), lora_alpha = r so s = 1. A changed
bias of an extracted linear is saved whole as ``<module>.base_layer.bias`` (PEFT's ``bias="all"`` layout). Every
other changed module — embeddings, norms, heads, a linear whose only change is its bias — is saved whole in
``modules_to_save``. The same approach as
PEFT-independent tools such as mergekit's ``mergekit-extract-lora``; the output loads with
``PeftModel.from_pretrained``. Only torch and safetensors are imported.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from weightsmith import architecture
from weightsmith.checkpoint import CheckpointWriter, provenance_step
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import ConfigError, IncompatibleError
from weightsmith.merge.lora.math import CONV1D, LINEAR, to_rows, truncated_factors
from weightsmith.merge.lora.read import PREFIX
from weightsmith.progress import progress
from weightsmith.report import Report


def extract(
    base, tuned, out: str | os.PathLike, *, rank: int | None = None, energy: float | None = None, force: bool = False
) -> Report:
    """Write ``tuned − base`` as a PEFT LoRA adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``): rank ``rank`` everywhere, or per module the smallest rank keeping ``energy`` of
    ΔW's squared singular values. The report lists rank and energy kept per module.

    >>> ws.lora.extract("llama", "llama-chat", "chat-adapter", rank=16)  # doctest: +SKIP
    """
    if (rank is None) == (energy is None):
        raise ConfigError("extract: give exactly one of rank or energy")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"extract: rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"extract: energy must be in (0, 1], got {energy!r}")
    b_ck, t_ck = as_checkpoint(base), as_checkpoint(tuned)
    _check_compatible(b_ck, t_ck)
    modules = _group(t_ck)
    conv1d = any(architecture.is_conv1d(b_ck.config, m) for m in modules)
    report = Report("lora extract", output=str(out))
    targets, saved, biases, ranks = [], [], [], {}
    rows: list[dict[str, Any]] = []
    step = provenance_step("lora extract", {"rank": rank, "energy": energy}, [b_ck, t_ck])
    with report.timed("total"):
        writer = CheckpointWriter(
            out, steps=[step], force=force, prefix="adapter_model", index_name=None, shard_size=2**62
        )
        with writer:
            for module, names in progress(list(modules.items()), desc="lora extract"):
                changed = [n for n in names if not torch.equal(b_ck[n], t_ck[n])]
                if not changed:
                    continue
                weight = f"{module}.weight"
                info = t_ck.info(weight) if weight in t_ck else None
                linear = (
                    info is not None
                    and len(info.shape) == 2
                    and info.dtype.is_floating_point
                    and weight in changed
                    # lookups and output heads are never LoRA-extracted: saved whole (modules_to_save)
                    and not (architecture.is_embedding(module) or architecture.is_head(module))
                )
                if not linear:  # saved whole, under the base key names
                    saved.append(module)
                    for n in names:
                        writer.write(PREFIX + n, t_ck[n])
                    continue
                kind = CONV1D if architecture.is_conv1d(b_ck.config, module) else LINEAR
                delta = to_rows(t_ck[weight].float() - b_ck[weight].float(), kind)  # [out, in]
                a, b, kept = truncated_factors(delta, rank=rank, energy=energy)
                writer.write(f"{PREFIX}{module}.lora_A.weight", a)
                writer.write(f"{PREFIX}{module}.lora_B.weight", b)
                bias = f"{module}.bias"
                if bias in changed:  # a trained bias is saved whole, as PEFT's bias="all" saves it
                    writer.write(f"{PREFIX}{module}.base_layer.bias", t_ck[bias])
                    biases.append(module)
                targets.append(module)
                ranks[module] = a.shape[0]
                residual = delta - b @ a
                rows.append(
                    {
                        "module": module,
                        "rank": a.shape[0],
                        "energy_kept": round(kept, 6),
                        "rel_error": round(float(residual.norm() / delta.norm()), 6),
                    }
                )
            if not targets and not saved:
                raise IncompatibleError(f"{t_ck.path}: identical to {b_ck.path}; there is nothing to extract")
            r = max(ranks.values(), default=rank or 1)
            config = unit_scale_config(
                targets,
                ranks,
                r,
                base_model=str(b_ck.path),
                fan_in_fan_out=conv1d,
                bias="all" if biases else "none",
                modules_to_save=saved,
            )
            writer.add_file("adapter_config.json", json.dumps(config, indent=2) + "\n")
    report.summary.update(
        base=str(b_ck.path),
        tuned=str(t_ck.path),
        lora_modules=len(targets),
        modules_to_save=len(saved),
        r=r,
        trained_biases=len(biases),
        mean_energy_kept=round(sum(x["energy_kept"] for x in rows) / len(rows), 6) if rows else None,
    )
    if saved:
        report.details["modules_to_save"] = {"modules": saved}
    report.tensors = rows
    return report


def _check_compatible(b_ck, t_ck) -> None:
    for ck in (b_ck, t_ck):
        if ck.is_adapter:
            raise IncompatibleError(f"{ck.path}: is a PEFT adapter; extract needs two full checkpoints")
    only_b = [n for n in b_ck if n not in t_ck]
    only_t = [n for n in t_ck if n not in b_ck]
    if only_b or only_t:
        first = (only_b or only_t)[0]
        raise IncompatibleError(
            f"{t_ck.path}: tensor names differ from {b_ck.path} ({len(only_b)} only in the base, "
            f"{len(only_t)} only in the fine-tune, e.g. {first!r})"
        )
    misfit = [n for n in b_ck if b_ck.info(n).shape != t_ck.info(n).shape]
    if misfit:
        n = misfit[0]
        raise IncompatibleError(
            f"{t_ck.path}: tensor {n!r} is {list(t_ck.info(n).shape)}, the base's is {list(b_ck.info(n).shape)}"
        )


def _group(ckpt) -> dict[str, list[str]]:
    modules: dict[str, list[str]] = {}
    for name in ckpt:
        modules.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    return modules


def unit_scale_config(
    targets: Sequence[str],
    ranks: dict[str, int],
    r: int,
    *,
    base_model: str | None,
    task_type: str | None = None,
    fan_in_fan_out: bool = False,
    bias: str = "none",
    modules_to_save: Sequence[str] = (),
) -> dict:
    """A LORA adapter_config.json: full module names as targets (PEFT matches them exactly), a per-module
    rank_pattern/alpha_pattern where a rank differs from ``r``, and α = r everywhere so that s = 1 (B·A is ΔW
    itself). Written by ``extract``, ``combine`` and ``resize``."""
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": bias,
        "init_lora_weights": True,
        "target_modules": sorted(targets) or None,
        "modules_to_save": sorted(modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
        "layer_replication": None,
    }
