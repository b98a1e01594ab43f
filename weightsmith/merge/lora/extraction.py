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
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsmith import architecture
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import ConfigError, IncompatibleError
from weightsmith.merge.lora.math import CONV1D, LINEAR, to_rows, truncated_factors
from weightsmith.merge.lora.read import PREFIX
from weightsmith.report import Report
from weightsmith.stream import Item, stream


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
    job = _Extraction(b_ck, t_ck, _group(t_ck), rank, energy)
    report = stream(
        t_ck,
        out,
        operation="lora extract",
        params={"rank": rank, "energy": energy},
        inputs=[b_ck, t_ck],
        names=job.modules,
        transform=job.module,
        config=None,
        carry=[],
        files=job.adapter_files,
        force=force,
        prefix="adapter_model",
        index_name=None,
        shard_size=2**62,
    )
    rows = job.rows
    report.summary.update(
        base=str(b_ck.path),
        tuned=str(t_ck.path),
        lora_modules=len(job.targets),
        modules_to_save=len(job.saved),
        r=job.r,
        trained_biases=len(job.biases),
        mean_energy_kept=round(sum(x["energy_kept"] for x in rows) / len(rows), 6) if rows else None,
    )
    if job.saved:
        report.details["modules_to_save"] = {"modules": job.saved}
    report.tensors = rows
    return report


@dataclass
class _Extraction:
    """The state of one extraction: what each module became, gathered as the modules stream by."""

    b_ck: Any
    t_ck: Any
    modules: dict[str, list[str]]
    rank: int | None
    energy: float | None
    targets: list[str] = field(default_factory=list)  # LoRA-extracted modules
    saved: list[str] = field(default_factory=list)  # modules saved whole (modules_to_save)
    biases: list[str] = field(default_factory=list)  # extracted modules whose trained bias is saved whole
    ranks: dict[str, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    r: int = 1

    def _is_linear(self, module: str, changed: list[str]) -> bool:
        weight = f"{module}.weight"
        info = self.t_ck.info(weight) if weight in self.t_ck else None
        return (
            info is not None
            and len(info.shape) == 2
            and info.dtype.is_floating_point
            and weight in changed
            # lookups and output heads are never LoRA-extracted: saved whole (modules_to_save)
            and not (architecture.is_embedding(module) or architecture.is_head(module))
        )

    def module(self, module: str) -> list[Item]:
        """The adapter tensors of one module: its LoRA factors (and trained bias), all of it, or nothing."""
        b_ck, t_ck, names = self.b_ck, self.t_ck, self.modules[module]
        changed = [n for n in names if not torch.equal(b_ck[n], t_ck[n])]
        if not changed:
            return []
        if not self._is_linear(module, changed):  # saved whole, under the base key names
            self.saved.append(module)
            return [(PREFIX + n, t_ck[n]) for n in names]
        weight = f"{module}.weight"
        kind = CONV1D if architecture.is_conv1d(b_ck.config, module) else LINEAR
        delta = to_rows(t_ck[weight].float() - b_ck[weight].float(), kind)  # [out, in]
        a, b, kept = truncated_factors(delta, rank=self.rank, energy=self.energy)
        items: list[Item] = [(f"{PREFIX}{module}.lora_A.weight", a), (f"{PREFIX}{module}.lora_B.weight", b)]
        bias = f"{module}.bias"
        if bias in changed:  # a trained bias is saved whole, as PEFT's bias="all" saves it
            items.append((f"{PREFIX}{module}.base_layer.bias", t_ck[bias]))
            self.biases.append(module)
        self.targets.append(module)
        self.ranks[module] = a.shape[0]
        residual = delta - b @ a
        self.rows.append(
            {
                "module": module,
                "rank": a.shape[0],
                "energy_kept": round(kept, 6),
                "rel_error": round(float(residual.norm() / delta.norm()), 6),
            }
        )
        return items

    def adapter_files(self) -> dict[str, str]:
        """adapter_config.json, once every module is known; refuses an extraction that found no change."""
        if not self.targets and not self.saved:
            raise IncompatibleError(f"{self.t_ck.path}: identical to {self.b_ck.path}; there is nothing to extract")
        self.r = max(self.ranks.values(), default=self.rank or 1)
        config = unit_scale_config(
            self.targets,
            self.ranks,
            self.r,
            base_model=str(self.b_ck.path),
            fan_in_fan_out=any(architecture.is_conv1d(self.b_ck.config, m) for m in self.modules),
            bias="all" if self.biases else "none",
            modules_to_save=self.saved,
        )
        return {"adapter_config.json": json.dumps(config, indent=2) + "\n"}


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
