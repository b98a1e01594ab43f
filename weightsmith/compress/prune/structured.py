"""Structured pruning that really shrinks the model: FFN neurons and attention heads are removed, config rewritten.

Per block i of a supported architecture:
- FFN neuron j: the rows j of the "up" projections (Llama gate/up, BERT intermediate.dense) with their biases and
  the column j of the "down" projection (Llama down_proj, BERT output.dense) go; ``intermediate_size`` shrinks.
- Attention head h: the rows h·d:(h+1)·d of q (and of k/v for its KV head when the KV head goes) and the same
  columns of o go; ``num_attention_heads``/``num_key_value_heads`` shrink and ``head_dim`` is written explicitly.
  With grouped-query attention the groups stay regular: the same number of query heads leaves every KV group, or
  whole groups (a KV head with all its query heads) leave.

Scores (the lowest-scoring units go; every block loses the same number, as the config holds one size):
- weights only: FFN  s_j = ‖down[:, j]‖₂ · Π_up ‖up[j, :]‖₂;   head  s_h = ‖Q_h‖_F · ‖O_h‖_F
- with calibration: FFN  s_j = ‖X_j‖₂ · ‖down[:, j]‖₂;   head  s_h = ‖X_{O,h}‖_F · ‖O_h‖_F, X being the input of
  down / o (the unit's activation), i.e. the Wanda score |W|·‖X‖ summed over the unit (as in FLAP, An et al. 2024).
Removing a unit is exactly the original model with that unit's output (its down column / o columns) set to zero.
BERT heads are refused: transformers 5 derives BERT's head size from hidden_size / num_attention_heads and no longer
reads ``pruned_heads``, so a BERT with fewer heads cannot be loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from weightsmith import architecture
from weightsmith.architecture import LLAMA_UNITS, PRUNE_FAMILIES, PruneFamily, Stack, Units
from weightsmith.compress.prune.methods import StructuredFFN, StructuredHeads
from weightsmith.errors import ConfigError
from weightsmith.report import Report
from weightsmith.sparsify import select_indices
from weightsmith.stream import Item, Written, stream
from weightsmith.units import format_size

# The stacks and units of each supported family (module names relative to a block) are architecture facts.
Arch = Units
FAMILIES = PRUNE_FAMILIES
# transformers' LlamaConfig refuses a hidden_size that is not a multiple of num_attention_heads, head_dim or not
HEADS_DIVIDE_HIDDEN = {"llama"}


def _get(config: dict, path: str):
    for part in path.split("."):
        config = config[part]
    return config


def _set(config: dict, path: str, value) -> dict:
    """A copy of ``config`` with the dotted ``path`` set (sub-configs copied, never mutated)."""
    head, _, rest = path.partition(".")
    new = dict(config)
    new[head] = _set(config[head], rest, value) if rest else value
    return new


@dataclass
class Geometry:
    """The attention and FFN sizes a config describes for one stack."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, config: dict, stack: Stack | None = None, layers: int | None = None) -> Geometry:
        stack = stack or Stack(LLAMA_UNITS)
        heads = _get(config, stack.heads)
        hidden = config.get("hidden_size") or 0
        return cls(
            layers=layers if layers is not None else config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate=_get(config, stack.ffn_width),
        )


def family_of(config: dict | None, path) -> PruneFamily:
    model_type = (config or {}).get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{path}: structured pruning supports {', '.join(FAMILIES)} models; this one is "
            f"{model_type or 'without a config.json model_type'}"
        )
    return FAMILIES[model_type]


def arch_of(config: dict | None, path) -> Arch:
    """The units of a family with one stack."""
    return family_of(config, path).stacks[0].units


def block_prefix(names, arch: Arch, path, scope: str = "") -> str:
    """The name prefix of block 0's parent, e.g. ``model.layers.`` or ``encoder.layer.`` (containing ``scope``)."""
    anchor = arch.ffn_cols[0]
    prefix = next((p for p in architecture.block_prefixes(names, anchor) if scope in p), None)
    if prefix is not None:
        return prefix
    raise ConfigError(f"{path}: no tensor named like '<{scope or 'prefix'}>0.{anchor}.weight': not the expected layout")


# -- scores (pure) ----------------------------------------------------------------------------------------------


def ffn_scores(rows: list[Tensor], down: Tensor, down_input_norm: Tensor | None = None) -> Tensor:
    """[inter] neuron scores from the up-type weights [inter, hidden] and the down weight [hidden, inter]."""
    score = down.float().norm(dim=0)
    if down_input_norm is not None:
        return score * down_input_norm.float()
    for w in rows:
        score = score * w.float().norm(dim=1)
    return score


def head_scores(q: Tensor, o: Tensor, head_dim: int, o_input_norm: Tensor | None = None) -> Tensor:
    """[heads] query-head scores from q [heads·d, hidden], o [hidden, heads·d] and o's input norms [heads·d]."""
    o_heads = o.float().reshape(o.shape[0], -1, head_dim).norm(dim=(0, 2))  # ‖O_h‖_F
    if o_input_norm is not None:
        return o_heads * o_input_norm.float().reshape(-1, head_dim).norm(dim=1)
    return o_heads * q.float().reshape(-1, head_dim, q.shape[1]).norm(dim=(1, 2))


def keep_lowest_removed(scores: Tensor, remove: int) -> Tensor:
    """Sorted indices kept after dropping the ``remove`` lowest scores."""
    order = torch.argsort(scores.float(), stable=True)
    return torch.sort(order[remove:]).values


def keep_heads_gqa(scores: Tensor, kv_heads: int, keep: int) -> tuple[Tensor, Tensor]:
    """Query heads and KV heads kept when ``keep`` of the query heads stay, GQA groups kept regular.

    If every group can keep keep/kv_heads query heads, each group drops its lowest ones (all KV heads stay);
    otherwise whole groups go, by their summed score. Returns sorted (query head indices, kv head indices).
    """
    heads = scores.numel()
    group = heads // kv_heads
    if keep % kv_heads == 0 and keep > 0:
        per = keep // kv_heads
        grid = scores.reshape(kv_heads, group)  # query head h belongs to KV head h // group
        kept = torch.sort(select_indices(grid, per, dim=1), dim=1).values
        q = (kept + torch.arange(kv_heads).unsqueeze(1) * group).reshape(-1)
        return q, torch.arange(kv_heads)
    if keep % group == 0 and keep > 0:
        kv = keep_lowest_removed(scores.reshape(kv_heads, group).sum(1), kv_heads - keep // group)
        q = (kv.unsqueeze(1) * group + torch.arange(group)).reshape(-1)
        return q, kv
    raise ConfigError(
        f"keeping {keep} of {heads} query heads with {kv_heads} KV heads: the count must be a "
        f"multiple of {kv_heads} (same heads per group) or of {group} (whole groups)"
    )


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Row (or column) indices of the given heads in a [heads·d, …] projection."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


# -- the plan ---------------------------------------------------------------------------------------------------


@dataclass
class BlockPlan:
    ffn: Tensor | None = None  # kept neuron indices
    q_heads: Tensor | None = None  # kept query heads
    kv_heads: Tensor | None = None  # kept KV heads


@dataclass
class StackPlan:
    """One stack's prefix, sizes, units kept per block and each block's plan."""

    stack: Stack
    prefix: str
    geo: Geometry
    keep: int
    blocks: list[BlockPlan]

    def label(self, i: int) -> str:
        return f"{self.stack.label} layer {i}".strip()


def slice_tensor(name: str, tensor: Tensor, plans: list[StackPlan]) -> Tensor:
    """The tensor with the plans' removed units cut out (unchanged if no plan touches it)."""
    for sp in plans:
        m = re.match(rf"^{re.escape(sp.prefix)}(\d+)\.(.+)\.(weight|bias)$", name)
        if m:
            return _slice_block(tensor, sp.stack.units, sp.blocks[int(m.group(1))], m.group(2), m.group(3), sp.geo)
    return tensor


def _slice_block(tensor: Tensor, arch: Arch, plan: BlockPlan, module: str, kind: str, geo: Geometry) -> Tensor:
    if plan.ffn is not None:
        if module in arch.ffn_rows:
            return tensor.index_select(0, plan.ffn)
        if module in arch.ffn_cols and kind == "weight":
            return tensor.index_select(1, plan.ffn)
    if plan.q_heads is not None:
        assert plan.kv_heads is not None  # head plans prune query and key/value heads together
        if module == arch.q:
            return tensor.index_select(0, head_rows(plan.q_heads, geo.head_dim))
        if module in (arch.k, arch.v):
            return tensor.index_select(0, head_rows(plan.kv_heads, geo.head_dim))
        if module == arch.o and kind == "weight":
            return tensor.index_select(1, head_rows(plan.q_heads, geo.head_dim))
    return tensor


def rewrite_config(config: dict, plans: list[StackPlan]) -> dict:
    """config.json for the smaller model: each stack's new width, ``head_dim`` explicit when heads changed."""
    new = dict(config)
    for sp in plans:
        first = sp.blocks[0]
        if first.ffn is not None:
            new = _set(new, sp.stack.ffn_width, int(first.ffn.numel()))
        if first.q_heads is not None:
            assert first.kv_heads is not None  # head plans prune query and key/value heads together
            new = _set(new, sp.stack.heads, int(first.q_heads.numel()))
            if "num_key_value_heads" in config:
                new["num_key_value_heads"] = int(first.kv_heads.numel())
            new["head_dim"] = sp.geo.head_dim
    return new


# -- the verb's structured branch -------------------------------------------------------------------------------


def prune_structured(ckpt, out, config: StructuredFFN | StructuredHeads, *, dtype, shard_size, force: bool) -> Report:
    """Remove FFN neurons (``StructuredFFN``) or attention heads (``StructuredHeads``) from every block of every
    stack of the family; see the module docstring for the scores. Returns the Report (kept units per block as index
    ranges in ``details["kept"]``, keyed "layer 3" or, with several stacks, "encoder layer 3")."""
    kind = "ffn" if isinstance(config, StructuredFFN) else "heads"
    family = family_of(ckpt.config, ckpt.path)
    _check_family(ckpt, family, kind, config.calibration)
    names = list(ckpt)
    plans = [_stack_plan(ckpt, names, stack, kind, config) for stack in family.stacks]
    params: dict[str, Any] = {"structured": kind, "ratio": config.ratio, "keep": plans[0].keep}
    params["calibration"] = config.calibration
    if len(plans) > 1:
        params["keep"] = {sp.stack.label: sp.keep for sp in plans}
    report = Report("prune", output=str(out))
    norms: dict[str, Tensor] = {}
    if config.calibration is not None:
        params.update(samples=config.samples, seq_len=config.seq_len)
        with report.timed("calibrate"):
            norms = _dense_norms(ckpt, config.calibration, config.samples, config.seq_len)
    with report.timed("score"):
        for sp in plans:
            sp.blocks = _plan_blocks(ckpt, kind, sp, norms, config.calibration)
    config_json = rewrite_config(ckpt.config, plans)
    with report.timed("write"):
        params_after, size_after = _write_sliced(
            ckpt, out, params, config_json, plans, dtype=dtype, shard_size=shard_size, force=force
        )
    _summarize(report, ckpt, kind, plans, bool(norms), params_after, size_after)
    keys = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    report.details["config"] = {k: config_json[k] for k in keys if k in config_json}
    for sp in plans:
        if sp.stack.scope:
            report.details["config"][sp.stack.ffn_width] = _get(config_json, sp.stack.ffn_width)
    report.details["kept"] = {
        sp.label(i): _ranges(b.ffn if kind == "ffn" else b.q_heads)  # type: ignore[arg-type]
        for sp in plans
        for i, b in enumerate(sp.blocks)
    }
    return report


def _check_family(ckpt, family: PruneFamily, kind: str, calibration) -> None:
    """Refuse, in one line naming what is supported, what the family cannot do."""
    model_type = ckpt.config["model_type"]
    if kind == "heads" and not all(s.units.heads for s in family.stacks):
        heads = [t for t, f in FAMILIES.items() if all(s.units.heads for s in f.stacks)]
        raise ConfigError(
            f"{ckpt.path}: head pruning of {model_type} is not supported (transformers derives its head size from "
            f"hidden_size / num_attention_heads); heads: {', '.join(heads)}; prune its FFN instead"
        )
    if calibration is not None and not family.text:
        text = [t for t, f in FAMILIES.items() if f.text]
        raise ConfigError(
            f"{ckpt.path}: activation scoring runs calibration text through the model, which {model_type} does not "
            f"take alone; supported for {', '.join(text)}: prune {model_type} by weights (no `calibration`)"
        )


def _stack_plan(ckpt, names: list[str], stack: Stack, kind: str, config) -> StackPlan:
    prefix = block_prefix(names, stack.units, ckpt.path, stack.scope)
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    layers = 1 + max(int(m.group(1)) for m in map(pattern.match, names) if m)
    geo = Geometry.of(ckpt.config, stack, layers)
    return StackPlan(stack, prefix, geo, _keep_count(ckpt, config, kind, geo), [])


def _summarize(report: Report, ckpt, kind: str, plans: list[StackPlan], by_activations, params_after, size_after):
    params_before = sum(i.numel for i in ckpt.infos() if i.dtype.is_floating_point)
    before = {sp.stack.label: sp.geo.intermediate if kind == "ffn" else sp.geo.heads for sp in plans}
    after = {sp.stack.label: sp.keep for sp in plans}
    one = len(set(before.values())) == 1 and len(set(after.values())) == 1  # one width everywhere: plain numbers
    report.summary.update(
        source=str(ckpt.path),
        structured=kind,
        scored_by="activations" if by_activations else "weights",
        units_before=next(iter(before.values())) if one else before,
        units_after=next(iter(after.values())) if one else after,
        params_before=params_before,
        params_after=params_after,
        params_ratio=round(params_after / params_before, 6),
        bytes_before=format_size(ckpt.nbytes),
        bytes_after=format_size(size_after),
    )


def _keep_count(ckpt, config: StructuredFFN | StructuredHeads, kind: str, geo: Geometry) -> int:
    """Units kept per block, checked against what the family's config and transformers accept."""
    units = geo.intermediate if kind == "ffn" else geo.heads
    keep_heads = config.keep_heads if isinstance(config, StructuredHeads) else None
    if keep_heads is not None:
        keep = keep_heads
    else:
        assert config.ratio is not None  # the config holds one of them
        keep = units - round(config.ratio * units)
    if not 0 < keep <= units:
        raise ConfigError(
            f"keeping {keep} of {units} {'neurons' if kind == 'ffn' else 'heads'} per block: "
            f"must be between 1 and {units}"
        )
    model_type, hidden = ckpt.config["model_type"], ckpt.config.get("hidden_size")
    if kind == "heads" and model_type in HEADS_DIVIDE_HIDDEN and hidden % keep:
        raise ConfigError(
            f"{ckpt.path}: {model_type} with {keep} heads would not load in transformers (hidden_size "
            f"{hidden} must be a multiple of num_attention_heads)"
        )
    return keep


def _plan_blocks(ckpt, kind: str, sp: StackPlan, norms, calibration) -> list[BlockPlan]:
    """Each block's kept units: its units scored (by weights, or activations) and the lowest ones dropped."""
    plans: list[BlockPlan] = []
    arch, geo = sp.stack.units, sp.geo
    for i in range(geo.layers):
        base = f"{sp.prefix}{i}."
        if kind == "ffn":
            down = ckpt[f"{base}{arch.ffn_cols[0]}.weight"]
            act = _norm_of(norms, f"{base}{arch.ffn_cols[0]}", calibration, ckpt)
            ups = [f"{base}{m}.weight" for m in arch.ffn_rows if f"{base}{m}.weight" in ckpt]
            scores = ffn_scores([] if act is not None else [ckpt[n] for n in ups], down, act)
            plans.append(BlockPlan(ffn=keep_lowest_removed(scores, geo.intermediate - sp.keep)))
        else:
            act = _norm_of(norms, f"{base}{arch.o}", calibration, ckpt)
            scores = head_scores(ckpt[f"{base}{arch.q}.weight"], ckpt[f"{base}{arch.o}.weight"], geo.head_dim, act)
            q, kv = keep_heads_gqa(scores, geo.kv_heads, sp.keep)
            plans.append(BlockPlan(q_heads=q, kv_heads=kv))
    return plans


def _write_sliced(ckpt, out, params, config, plans: list[StackPlan], *, dtype, shard_size, force):
    """Write every tensor with the plans' units cut out; returns (float parameters written, bytes written)."""
    tally = {"params": 0, "bytes": 0}

    def sliced(name: str) -> list[Item]:
        tensor = slice_tensor(name, ckpt[name], plans)
        tally["params"] += tensor.numel() if tensor.is_floating_point() else 0  # not buffers like position_ids
        return [(name, tensor)]

    def remember(written: Written) -> dict[str, Any]:
        tally["bytes"] = written.bytes
        return {}

    stream(
        ckpt,
        out,
        operation="prune",
        params=params,
        config=config,
        transform=sliced,
        summary=remember,
        desc="prune",
        dtype=dtype,
        shard_size=shard_size,
        force=force,
    )
    return tally["params"], tally["bytes"]


def _norm_of(norms: dict, module: str, calibration, ckpt) -> Tensor | None:
    if calibration is None:
        return None
    if module not in norms:
        raise ConfigError(f"{ckpt.path}: calibration produced no activations for {module!r}")
    return norms[module]


def _dense_norms(ckpt, calibration, samples: int, seq_len: int) -> dict[str, Tensor]:
    from weightsmith.compress.prune.wanda import input_norms
    from weightsmith.evaluation import encode, load_model, load_tokenizer, read_texts

    texts = read_texts(calibration, what="calibration file")
    batches = encode(load_tokenizer(ckpt.path), texts[:samples], seq_len)
    return input_norms(load_model(ckpt.path), batches)


def _ranges(indices: Tensor) -> str:
    """``0-5,7,9-20``: sorted indices as compact ranges."""
    parts, values = [], indices.tolist()
    start = prev = values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def parse_ranges(text: str) -> list[int]:
    """The inverse of the report's ``0-5,7,9-20`` ranges."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out
