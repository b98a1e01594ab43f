"""The mixture-of-experts merge's streaming: check every input from its config and headers, compute the routers,
then write the base's tensors and each layer's stacked experts (see ``moe`` for the config).

Peak memory is one layer's experts (every expert's MLP of that layer, stacked) plus the routers
(layers × experts × hidden float32) and, for ``cheap_embed`` and the ``hidden`` modes, the base's token embedding
once (the ``hidden`` modes then hold one decoder layer of the base at a time, ``merge.hidden``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch

from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, TensorSource
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.merge.engine import open_input, provenance_sources, tensor_seed
from weightsmith.merge.gates import cheap_embed_gate, hidden_gate, random_gates
from weightsmith.merge.moe import DENSE_TYPES, PROMPT_MODES, Expert, MoEConfig, load_moe_config
from weightsmith.report import Report
from weightsmith.stream import Item, Stored, Written, stream
from weightsmith.units import format_size, parse_dtype

_MLP = ("gate_proj", "up_proj", "down_proj")  # a dense Llama/Mistral block's MLP; fused in the output
_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size")
_EMBED = "model.embed_tokens.weight"
# Mixtral's defaults for the keys a dense config lacks (transformers' MixtralConfig, as mergekit-moe writes them)
_MIXTRAL_DEFAULTS = {"router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "output_router_logits": False}


def mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def run(
    config: str | os.PathLike | Mapping | MoEConfig,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
) -> Report:
    """Build a Mixtral model from a mergekit-moe config into ``out`` (written atomically); returns the report.
    ``dtype`` overrides the config's; ``seed`` drives the ``random`` routers and the experts' ``noise_scale``.

    >>> ws.merge.run("moe.yml", "moe/")  # doctest: +SKIP
    """
    cfg = config if isinstance(config, MoEConfig) else load_moe_config(config)
    report = Report("merge", output=str(out))
    with report.timed("open"):
        base = open_input(cfg.base_model)
        experts = {e.source_model: open_input(e.source_model) for e in cfg.experts}
    with report.timed("plan"):
        base_cfg = check_inputs(cfg, base, experts)
    out_dtype = parse_dtype(dtype or cfg.dtype or base_cfg.get("dtype") or base_cfg.get("torch_dtype"))
    with report.timed("gates"):
        gates = router_weights(cfg, base, base_cfg, seed)  # (layers, experts, hidden) float32
    sources = [base] + [experts[m] for m in dict.fromkeys(e.source_model for e in cfg.experts)]
    kept = [n for n in base if ".mlp." not in n and not n.endswith("rotary_emb.inv_freq")]
    layers = {f"model.layers.{layer}.mlp": layer for layer in range(gates.shape[0])}

    def moe_tensors(name: str) -> list[Item]:
        """The base's tensors but its MLPs (bytes as stored when the dtype is kept), then each layer's router and
        fused experts."""
        if name not in layers:
            return [(name, Stored(base, name) if isinstance(base, TensorSource) else base[name])]
        layer, prefix = layers[name], name + "."
        gate_up, down = layer_experts(cfg, experts, layer, seed, out_dtype)
        router = gates[layer].to(out_dtype or gates.dtype).contiguous()
        return [
            (prefix + "gate.weight", router),
            (prefix + "experts.gate_up_proj", gate_up),
            (prefix + "experts.down_proj", down),
        ]

    written: list[Written] = []

    def remember(figures: Written) -> dict[str, Any]:
        written.append(figures)
        return {}  # the summary is built below

    stream(
        cast(TensorSource, base),  # a checkpoint, or a lazy view of one (base+adapter)
        out,
        operation="merge",
        params={"moe": dict(cfg.parameters), "seed": seed},
        inputs=provenance_sources(sources),
        names=kept + list(layers),
        transform=moe_tensors,
        config=mixtral_config(base_cfg, len(cfg.experts), cfg.experts_per_token),
        carry=list(getattr(base, "carry_files", [])),
        summary=remember,
        report=report,
        desc="merge",
        dtype=out_dtype,
        shard_size=shard_size,
        force=force,
        timing="merge",
    )
    report.summary.update(
        method="moe",
        base=cfg.base_model,
        experts=[e.source_model for e in cfg.experts],
        gate_mode=cfg.gate_mode,
        experts_per_token=cfg.experts_per_token,
        tensors=written[0].tensors,
        bytes_out=format_size(written[0].bytes),
        shards=written[0].shards,
        seed=seed,
    )
    if len(experts) == 1 and len(cfg.experts) > 1:
        report.notes.append("every expert is the same model: the MoE computes what that model does, at more cost")
    return report


def mixtral_config(base_cfg: Mapping[str, Any], experts: int, per_token: int) -> dict:
    """The output config.json: the base's, as a Mixtral with ``experts`` experts and top-``per_token`` routing
    (no sliding window, as mergekit-moe writes it)."""
    out = {k: v for k, v in base_cfg.items() if k not in ("architectures", "model_type", "auto_map")}
    for key, value in _MIXTRAL_DEFAULTS.items():
        out.setdefault(key, value)
    out.update(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=experts,
        num_experts_per_tok=per_token,
        sliding_window=None,
    )
    return out


def check_inputs(cfg: MoEConfig, base: Any, experts: Mapping[str, Any]) -> dict:
    """Every check that needs no weight: model types, shapes from the configs, every expert tensor's presence and
    shape from the headers, no bias a Mixtral block could not hold. Returns the base's config."""
    base_cfg = _dense_config(cfg.base_model, base, "base_model")
    biases = [n for n in base if n.endswith("_proj.bias")]
    if biases:
        raise CheckpointError(
            f"base_model: {cfg.base_model} has projection biases ({biases[0]}, …) that a Mixtral block has no "
            "place for: use a base without them"
        )
    if cfg.gate_mode in PROMPT_MODES and _EMBED not in base:
        raise CheckpointError(f"base_model: {cfg.base_model} has no {_EMBED} for gate_mode {cfg.gate_mode}")
    layers, hidden, inter = (base_cfg[k] for k in _SHAPE_KEYS)
    want = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for i, e in enumerate(cfg.experts):
        where = f"experts[{i}]"
        ecfg = _dense_config(e.source_model, experts[e.source_model], where)
        if ecfg["model_type"] != base_cfg["model_type"]:
            raise ConfigError(
                f"{where}: {e.source_model} is a {ecfg['model_type']} model, the base a {base_cfg['model_type']} "
                "one: every expert must have the base's architecture"
            )
        for key in _SHAPE_KEYS:
            if ecfg[key] != base_cfg[key]:
                raise ConfigError(
                    f"{where}: {e.source_model} has {key} {ecfg[key]}, the base {base_cfg[key]}: every expert "
                    "must have the base's shape"
                )
        ckpt = experts[e.source_model]
        for layer in range(layers):
            for proj, shape in want.items():
                name = mlp_name(layer, proj)
                if name not in ckpt:
                    raise CheckpointError(f"{where}: {e.source_model} has no tensor {name!r}")
                if tuple(ckpt.info(name).shape) != shape:
                    raise CheckpointError(
                        f"{where}: {e.source_model}: tensor {name!r} has shape {tuple(ckpt.info(name).shape)}, "
                        f"expected {shape}"
                    )
    return base_cfg


def _dense_config(ref: str, ckpt: Any, where: str) -> dict:
    config = getattr(ckpt, "config", None)
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: {ref} has no config.json: a MoE merge needs each model's architecture")
    kind = config.get("model_type")
    if kind not in DENSE_TYPES:
        raise ConfigError(
            f"{where}: {ref} is a {kind!r} model: a Mixtral MoE is built from {' or '.join(DENSE_TYPES)} models"
        )
    missing = [k for k in _SHAPE_KEYS if not isinstance(config.get(k), int)]
    if missing:
        raise CheckpointError(f"{where}: {ref}: config.json has no integer {missing[0]}")
    if config.get("mlp_bias"):
        raise ConfigError(f"{where}: {ref} has MLP biases (mlp_bias), which a Mixtral expert has no place for")
    return config


def router_weights(cfg: MoEConfig, base: Any, base_cfg: Mapping[str, Any], seed: int) -> torch.Tensor:
    """Every layer's router, (layers, experts, hidden) float32, as the config's ``gate_mode`` makes them."""
    layers, hidden = base_cfg["num_hidden_layers"], base_cfg["hidden_size"]
    if cfg.gate_mode in ("random", "uniform_random"):
        return random_gates(layers, len(cfg.experts), hidden, seed, uniform=cfg.gate_mode == "uniform_random")
    if cfg.gate_mode != "cheap_embed":
        return _hidden_routers(cfg, base)
    embed = base[_EMBED]  # (vocab, hidden)
    tokenize = _tokenizer(cfg.base_model, base, embed.shape[0])
    rows = [cheap_embed_gate(embed, tokenize(e.positive_prompts), tokenize(e.negative_prompts)) for e in cfg.experts]
    return torch.stack(rows).unsqueeze(0).expand(layers, -1, -1)  # the same router in every layer


def _hidden_routers(cfg: MoEConfig, base: Any) -> torch.Tensor:
    """The ``hidden`` modes' routers, (layers, experts, hidden) float32: the base run on every expert's prompt
    batches in one pass over its layers."""
    from weightsmith.merge.hidden import batch, prompt_states

    tok = _load_tokenizer(cfg.base_model, base)
    rows = base.info(_EMBED).shape[0] if hasattr(base, "info") else base[_EMBED].shape[0]
    batches = []
    for e in cfg.experts:
        for prompts in (e.positive_prompts, e.negative_prompts):
            if prompts:
                batches.append(batch(tok, prompts))
                _check_ids(cfg.base_model, prompts, batches[-1]["input_ids"].tolist(), rows)
    states = iter(prompt_states(base, batches, cfg.gate_mode))
    gates = [hidden_gate(next(states), next(states) if e.negative_prompts else None) for e in cfg.experts]
    return torch.stack(gates, dim=1).float()


def _load_tokenizer(ref: str, base: Any) -> Any:
    from transformers import AutoTokenizer

    root = Path(getattr(base, "root", getattr(base, "path", ref)))
    try:
        return AutoTokenizer.from_pretrained(str(root))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"base_model: {ref}: no tokenizer to read the prompts with ({str(exc).splitlines()[0]})"
        ) from None


def _check_ids(ref: str, prompts: tuple[str, ...], ids: list[list[int]], rows: int) -> None:
    for p, row in zip(prompts, ids):
        if row and max(row) >= rows:
            raise CheckpointError(
                f"base_model: {ref}: prompt {p!r} has token id {max(row)}, past the {rows} rows of {_EMBED}"
            )


def _tokenizer(ref: str, base: Any, rows: int):
    """A function from prompts to token ids as mergekit-moe tokenizes them: the BOS token's text, then the prompt,
    with no other special token added."""
    tok = _load_tokenizer(ref, base)

    def tokenize(prompts: tuple[str, ...]) -> list[list[int]]:
        ids = [tok((tok.bos_token or "") + p, add_special_tokens=False)["input_ids"] for p in prompts]
        _check_ids(ref, prompts, ids, rows)
        return ids

    return tokenize


def layer_experts(
    cfg: MoEConfig, experts: Mapping[str, Any], layer: int, seed: int, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s experts fused as transformers' Mixtral holds them: gate_up_proj (experts, 2·inter,
    hidden) — each expert's gate_proj rows then its up_proj rows — and down_proj (experts, hidden, inter)."""
    gate_up, down = [], []
    for j, e in enumerate(cfg.experts):
        w = {p: _expert_weight(experts[e.source_model], mlp_name(layer, p), e, j, seed, out_dtype) for p in _MLP}
        gate_up.append(torch.cat([w["gate_proj"], w["up_proj"]], dim=0))
        down.append(w["down_proj"])
    return torch.stack(gate_up), torch.stack(down)


def _expert_weight(
    ckpt: Any, name: str, expert: Expert, index: int, seed: int, out_dtype: torch.dtype | None
) -> torch.Tensor:
    """One expert tensor: W + σ·N(0, 1) when the expert has a ``noise_scale`` σ (drawn from the seed, the tensor's
    name and the expert's index), then × ``residual_scale`` for down_proj; in the output dtype."""
    t = ckpt[name]
    dtype = out_dtype or t.dtype
    if expert.noise_scale is None and (expert.residual_scale is None or "down_proj" not in name):
        return t.to(dtype)
    t = t.float()
    if expert.noise_scale is not None:
        g = torch.Generator().manual_seed(tensor_seed(seed, name, index))
        t = t + torch.randn(t.shape, generator=g) * expert.noise_scale
    if expert.residual_scale is not None and "down_proj" in name:
        t = t * expert.residual_scale
    return t.to(dtype)
