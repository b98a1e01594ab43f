"""Architecture facts: the one place every verb asks what a tensor *is*.

Two tiers, so that the streaming verbs keep their start-up (torch and numpy only):

- **Name and shape facts** (no import beyond ``re``): Conv1D orientation (``is_conv1d``, ``as_rows``,
  ``in_features``), embeddings and output heads (``is_embedding``, ``is_head``), Linear weights
  (``is_linear_weight``), the block a tensor belongs to (``split_layer``, ``layer_index``), the layer count
  (``LAYER_COUNT_KEYS``, ``num_layers``), block prefixes (``block_prefix``), tied output heads a checkpoint does not
  store (``tied_heads``) and the structured-pruning units of each family (``UNITS``). The conformance tests check
  these rules against transformers' own model classes for every architecture they cover, so they cannot drift
  silently.
- **transformers' own facts** (``model_facts``): built lazily from the model class a config.json names, instantiated
  on the meta device (no memory, ~50 ms) — the weights transformers ties (``_tied_weights_keys`` as the config
  resolves them), the modules it keeps in float32 (``_keep_in_fp32_modules``, gathered over sub-models), which
  modules are ``nn.Linear`` and ``Conv1D``, and the parameters it saves under older names than it has in memory
  (``checkpoint_names``: ViT, LLaVA, GPT-NeoX's head; from its weight-conversion mapping). Importing transformers
  and the model's module costs seconds, so only a verb whose output transformers must load exactly as it expects
  (``quantize``), or a fold whose adapter names a target the checkpoint lacks, asks for them; and the answer is
  kept on disk (``weightsmith.cache``, keyed by the config and transformers' version) for the next run.

Orientation: every 2-D weight is ``[out, in]`` except transformers' ``Conv1D`` (GPT-2, GPT, ImageGPT, Decision
Transformer: ``c_attn``, ``q_attn``, ``c_proj``, ``c_fc``), stored ``[in, out]``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

from weightsmith.errors import ConfigError

# -- Conv1D -------------------------------------------------------------------------------------------------------

# Model types whose projections are transformers' Conv1D, and the module names that are Conv1D in them.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_MODULES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})


def model_type(config: Mapping | None) -> str | None:
    return (config or {}).get("model_type")


def module_of(name: str) -> str:
    """``a.b.weight`` → ``a.b`` (the module a parameter belongs to)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def is_conv1d(config: Mapping | None, name: str) -> bool:
    """Whether the 2-D weight ``name`` (or the module ``name``) is a Conv1D, stored ``[in, out]``."""
    if model_type(config) not in CONV1D_MODEL_TYPES:
        return False
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return leaf in CONV1D_MODULES


def as_rows(config: Mapping | None, name: str, tensor):
    """The ``[out, in]`` view of a 2-D weight (a transpose for Conv1D, the tensor itself otherwise)."""
    return tensor.t() if is_conv1d(config, name) else tensor


def in_features(config: Mapping | None, name: str, shape: tuple[int, ...]) -> int:
    """The input width of a 2-D weight of ``shape``."""
    return shape[0] if is_conv1d(config, name) else shape[1]


# -- embeddings, heads, Linear weights ----------------------------------------------------------------------------

# A module whose 2-D weight is a lookup table, not a matmul: its last name component contains "embed" (embed_tokens,
# word_embeddings, position_embedding, embed_positions, embed_in/embed_out…) or is GPT-2's wte/wpe, T5's shared or
# its relative attention bias.
_EMBEDDING = re.compile(r"embed|^wte$|^wpe$|^shared$|^relative_attention_bias$")
# The same, as a regex searched in a parameter name (for user-facing skip lists).
EMBEDDING_PARAMETER = r"embed|(^|\.)(wte|wpe|shared|relative_attention_bias)\."
# Output heads and task heads (lm_head, GPT-NeoX's embed_out, Whisper's proj_out, BERT's MLM decoder, classifiers).
HEADS = ("lm_head", "score", "classifier", "qa_outputs")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|proj_out|score|classifier|qa_outputs)$|(^|\.)cls\.predictions\.decoder$")


def is_embedding(module: str) -> bool:
    """Whether ``module`` (a module name, not a parameter name) is an embedding table."""
    return _EMBEDDING.search(module.rsplit(".", 1)[-1]) is not None


def is_head(module: str) -> bool:
    """Whether ``module`` is an output or task head."""
    return _HEAD.search(module) is not None


# Mixture-of-experts weights stored one expert at a time ("experts.3.w1") and their routers: transformers fuses the
# experts into 3-D parameters on load and builds routers as modules of their own, neither of them nn.Linear.
_MOE = re.compile(r"\.experts\.\d+\.|(^|\.)(block_sparse_moe|mlp)\.gate$")


def is_per_expert(module: str) -> bool:
    """Whether ``module`` is one expert's projection of a MoE layer stored expert by expert (``experts.3.w1``)."""
    return re.search(r"\.experts\.\d+\.", module) is not None


def is_linear_weight(config: Mapping | None, name: str, shape: tuple[int, ...], floating: bool) -> bool:
    """Whether ``name`` is the weight of an ``nn.Linear``, judged from its name and shape: a 2-D float ``.weight``
    that is not an embedding, not a Conv1D and not a per-expert MoE weight or router (heads count: they are
    Linear)."""
    if not name.endswith(".weight") or len(shape) != 2 or not floating:
        return False
    module = name.removesuffix(".weight")
    return not is_embedding(module) and not is_conv1d(config, name) and _MOE.search(module) is None


# -- positions ----------------------------------------------------------------------------------------------------

# RoBERTa-like models number positions from padding_idx + 1: max_position_embeddings − (pad_token_id + 1) usable.
_POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "data2vec-text"})


def max_positions(config: Mapping | None) -> int:
    """The longest sequence the model's position table takes (512 when the config does not say)."""
    config = config or {}
    limit = int(config.get("max_position_embeddings") or config.get("n_positions") or 512)
    if model_type(config) in _POSITIONS_AFTER_PADDING:
        limit -= int(config.get("pad_token_id") or 0) + 1
    return limit


# -- blocks -------------------------------------------------------------------------------------------------------

# "model.layers.3.mlp…", "encoder.layer.3.…", "transformer.h.3.…", "blocks.3.…", T5's "encoder.block.3.layer.1.…"
# (the first match from the left: T5's "layer.1" is a sub-layer of block 3).
_LAYER = re.compile(r"^(?P<pre>(?:.*?\.)?(?:layers|layer|h|blocks|block))\.(?P<idx>\d+)\.(?P<post>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def split_layer(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.up_proj.weight`` → ``("model.layers", 3, "mlp.up_proj.weight")``; None outside blocks."""
    m = _LAYER.match(name)
    return (m["pre"], int(m["idx"]), m["post"]) if m else None


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to (``model.layers.3.mlp…`` → 3), or None outside the blocks."""
    split = split_layer(name)
    return split[1] if split else None


def declared_layers(config: Mapping | None) -> int | None:
    """The layer count a config declares (the first of ``LAYER_COUNT_KEYS`` it holds), or None."""
    for key in LAYER_COUNT_KEYS:
        if config and isinstance(config.get(key), int):
            return config[key]
    return None


def num_layers(config: Mapping | None, names: Iterable[str]) -> int:
    """The declared layer count, else one more than the highest block index among ``names`` (1 when none)."""
    declared = declared_layers(config)
    if declared is not None:
        return declared
    found = [i for i in map(layer_index, names) if i is not None]
    return max(found) + 1 if found else 1


def block_prefix(names: Iterable[str], anchor: str) -> str | None:
    """The name prefix of block 0's parent whose block holds ``anchor`` (a module name relative to the block), e.g.
    ``model.layers.`` for ``self_attn.q_proj``, or None."""
    pattern = re.compile(rf"^(.*?)0\.{re.escape(anchor)}\.weight$")
    for name in names:
        m = pattern.match(name)
        if m:
            return m.group(1)
    return None


# -- tied heads (names only) ----------------------------------------------------------------------------------------

_TIED_HEADS = {"CausalLM": "lm_head.weight", "LMHead": "lm_head.weight", "MaskedLM": "cls.predictions.decoder.weight"}
_INPUT_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$")


def tied_heads(config: Mapping | None, names: Iterable[str]) -> dict[str, str]:
    """Output-embedding names a checkpoint does not store because they share its input embedding, judged from names:
    ``{missing: stored}`` for the common heads (causal LM, LM head, masked LM). ``model_facts(config).tied`` has the
    exact set, from transformers."""
    if config is None or not config.get("tie_word_embeddings", True):
        return {}
    archs = " ".join(config.get("architectures") or [])
    head = next((h for key, h in _TIED_HEADS.items() if key in archs), None)
    names = list(names)
    if head is None or head in names:
        return {}
    embed = next((n for n in names if _INPUT_EMBEDDING.search(n)), None)
    return {head: embed} if embed else {}


# -- structured-pruning units ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Units:
    """Module names (relative to a block) of one family's structured-pruning units."""

    ffn_rows: tuple[str, ...]  # weights [inter, hidden] whose rows are neurons
    ffn_cols: tuple[str, ...]  # weights [hidden, inter] whose columns are neurons
    q: str
    k: str
    v: str
    o: str
    heads: bool  # whether a model with fewer heads still loads in transformers


LLAMA_UNITS = Units(
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    heads=True,
)
BERT_UNITS = Units(
    ("intermediate.dense",),
    ("output.dense",),
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    heads=False,
)
UNITS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), LLAMA_UNITS),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta"), BERT_UNITS),
}
# ViT's files keep BERT-style names (transformers 5 renames them on load); its head size is read from `head_dim`
# when the config has one, so fewer heads load.
VIT_UNITS = Units(
    ("intermediate.dense",),
    ("output.dense",),
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
    "attention.output.dense",
    heads=True,
)
# T5's FFN is `wi` (ReLU) or `wi_0`/`wi_1` (gated, v1.1); only those present are sliced. The FFN is sub-layer 1 of
# an encoder block and sub-layer 2 of a decoder block (after cross-attention).
_T5_FFN = ("DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1")
T5_ENCODER_UNITS = Units(
    tuple(f"layer.1.{m}" for m in _T5_FFN),
    ("layer.1.DenseReluDense.wo",),
    "layer.0.SelfAttention.q",
    "layer.0.SelfAttention.k",
    "layer.0.SelfAttention.v",
    "layer.0.SelfAttention.o",
    heads=False,
)
T5_DECODER_UNITS = Units(
    tuple(f"layer.2.{m}" for m in _T5_FFN),
    ("layer.2.DenseReluDense.wo",),
    "layer.0.SelfAttention.q",
    "layer.0.SelfAttention.k",
    "layer.0.SelfAttention.v",
    "layer.0.SelfAttention.o",
    heads=False,
)
# BART, Whisper (fc1/fc2 in the block) and CLIP (mlp.fc1/fc2): head counts come from hidden_size / heads.
FC_UNITS = Units(("fc1",), ("fc2",), "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 heads=False)  # fmt: skip
# OPT's decoder blocks hold fc1/fc2 beside self_attn.*_proj, as BART's do; its width key is `ffn_dim`.
DISTILBERT_UNITS = Units(
    ("ffn.lin1",),
    ("ffn.lin2",),
    "attention.q_lin",
    "attention.k_lin",
    "attention.v_lin",
    "attention.out_lin",
    heads=False,
)
# GPT-NeoX fuses q, k and v into one projection: its FFN is pruned, its heads are not.
NEOX_UNITS = Units(
    ("mlp.dense_h_to_4h",),
    ("mlp.dense_4h_to_h",),
    "attention.query_key_value",
    "attention.query_key_value",
    "attention.query_key_value",
    "attention.dense",
    heads=False,
)
CLIP_UNITS = Units(
    ("mlp.fc1",),
    ("mlp.fc2",),
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    heads=False,
)


@dataclass(frozen=True)
class Stack:
    """One stack of blocks of a family: its units and the config keys that hold its sizes (a dotted path reaches
    into a sub-config). ``scope`` is text its block prefix contains ("" when the family has one stack)."""

    units: Units
    scope: str = ""
    label: str = ""  # how reports name its blocks ("encoder layer 3"); "" → "layer 3"
    ffn_width: str = "intermediate_size"
    heads: str = "num_attention_heads"


@dataclass(frozen=True)
class PruneFamily:
    """The stacks structured pruning shrinks. ``text``: the model runs on input_ids alone, so its units can be scored
    by activations on calibration text. Stacks that share a width key are pruned to the same width."""

    stacks: tuple[Stack, ...]
    text: bool = True


def _seq2seq(units_enc: Units, units_dec: Units, enc: tuple[str, str], dec: tuple[str, str]) -> PruneFamily:
    return PruneFamily(
        (Stack(units_enc, "encoder.", "encoder", *enc), Stack(units_dec, "decoder.", "decoder", *dec)), text=False
    )


_BART = (("encoder_ffn_dim", "encoder_attention_heads"), ("decoder_ffn_dim", "decoder_attention_heads"))
PRUNE_FAMILIES: dict[str, PruneFamily] = {
    **{t: PruneFamily((Stack(u),)) for t, u in UNITS.items()},
    "vit": PruneFamily((Stack(VIT_UNITS),), text=False),
    "opt": PruneFamily((Stack(FC_UNITS, ffn_width="ffn_dim"),)),
    "distilbert": PruneFamily((Stack(DISTILBERT_UNITS, ffn_width="hidden_dim", heads="n_heads"),)),
    "gpt_neox": PruneFamily((Stack(NEOX_UNITS),)),
    "t5": _seq2seq(T5_ENCODER_UNITS, T5_DECODER_UNITS, ("d_ff", "num_heads"), ("d_ff", "num_heads")),
    "bart": _seq2seq(FC_UNITS, FC_UNITS, *_BART),
    "whisper": _seq2seq(FC_UNITS, FC_UNITS, *_BART),
    "clip": PruneFamily(
        (
            Stack(
                CLIP_UNITS, "text_model.", "text", "text_config.intermediate_size", "text_config.num_attention_heads"
            ),
            Stack(
                CLIP_UNITS,
                "vision_model.",
                "vision",
                "vision_config.intermediate_size",
                "vision_config.num_attention_heads",
            ),  # fmt: skip
        ),
        text=False,
    ),
}


def block_prefixes(names: Iterable[str], anchor: str) -> list[str]:
    """Every name prefix of a block 0's parent whose block holds ``anchor``, in the order the names come."""
    pattern = re.compile(rf"^(.*?)0\.{re.escape(anchor)}\.weight$")
    found = [m.group(1) for m in map(pattern.match, names) if m]
    return list(dict.fromkeys(found))


# Decoder-only families whose base model is an embedding, a rotary embedding, a list of decoder layers called as
# layer(hidden, **inputs) and a final norm: what calibration one layer at a time (GPTQ) rebuilds from config.json.
LAYERWISE_DECODERS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Encoder families whose base model is embeddings, a list of encoder layers called as layer(hidden, mask, …) and an
# optional pooler: calibrated the same way (GPTQ of sentence encoders such as all-MiniLM-L6-v2).
LAYERWISE_ENCODERS = frozenset({"bert", "roberta", "xlm-roberta"})


# -- transformers' own facts ------------------------------------------------------------------------------------------


_FACTS_CACHE = "model-facts"  # weightsmith.cache's folder for ModelFacts


@dataclass(frozen=True)
class ModelFacts:
    """What transformers' model class says about a config (see ``model_facts``)."""

    model_class: str
    tied: dict[str, str]  # {tied weight: the weight it shares}, as this config resolves tie_word_embeddings
    keep_fp32: tuple[str, ...]  # module patterns transformers keeps in float32 (and never quantizes)
    modules: frozenset[str]  # every module that holds a parameter of its own
    linear: frozenset[str]  # modules that are nn.Linear
    conv1d: frozenset[str]  # modules that are transformers' Conv1D
    output_head: str | None  # the module ``get_output_embeddings()`` returns
    saved: dict[str, str] = field(default_factory=dict)  # {name in memory: name in the checkpoint}, where they differ

    def to_json(self) -> dict[str, Any]:
        """These facts as JSON values (sets as sorted lists), for ``weightsmith.cache``."""
        return {
            f.name: sorted(value) if isinstance(value, (frozenset, tuple)) else value
            for f in fields(self)
            for value in [getattr(self, f.name)]
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelFacts:
        """The inverse of ``to_json``; a missing field or a value of the wrong type raises."""
        facts = cls(
            model_class=str(data["model_class"]),
            tied={str(k): str(v) for k, v in dict(data["tied"]).items()},
            keep_fp32=tuple(map(str, data["keep_fp32"])),
            modules=frozenset(map(str, data["modules"])),
            linear=frozenset(map(str, data["linear"])),
            conv1d=frozenset(map(str, data["conv1d"])),
            output_head=None if data["output_head"] is None else str(data["output_head"]),
            saved={str(k): str(v) for k, v in dict(data["saved"]).items()},
        )
        if set(data) != {f.name for f in fields(cls)}:
            raise ValueError("model facts with other fields")
        return facts


def model_facts(config: Mapping | None, where: str | os.PathLike | None = None) -> ModelFacts | None:
    """transformers' facts for ``config`` (a config.json dict): its model class (the first of ``architectures``, else
    the base model of its ``model_type``) instantiated on the meta device. None without a config, or when
    transformers does not know the model type; a ``ConfigError`` naming ``where`` (the checkpoint) when transformers
    knows the type but cannot build a model from this config. Deriving them imports transformers (seconds), so they
    are kept in ``weightsmith.cache`` under the config and the installed transformers version: a later run on the
    same kind of model reads them back without importing transformers."""
    if not config or not config.get("model_type"):
        return None
    try:
        return _facts(json.dumps(dict(config), sort_keys=True, default=str))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where is not None else str(exc)) from None


@lru_cache(maxsize=8)
def _facts(config_json: str) -> ModelFacts | None:
    from importlib.metadata import PackageNotFoundError, version

    from weightsmith import cache

    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        transformers_version = None
    key = json.dumps(
        {"config": config_json, "transformers": transformers_version, "fields": [f.name for f in fields(ModelFacts)]}
    )
    stored = cache.load(_FACTS_CACHE, key)
    if isinstance(stored, dict):
        try:
            return ModelFacts.from_json(stored)
        except (KeyError, TypeError, ValueError):
            pass  # an entry of another shape: derived again and replaced
    facts = _derive_facts(config_json)
    if facts is not None and transformers_version is not None:
        cache.store(_FACTS_CACHE, key, facts.to_json())
    return facts


def _derive_facts(config_json: str) -> ModelFacts | None:
    """The facts read off the model class built on the meta device (see ``model_facts``)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel

    config: dict[str, Any] = json.loads(config_json)
    if config["model_type"] not in transformers.CONFIG_MAPPING:
        return None
    cls = next(
        (getattr(transformers, a) for a in config.get("architectures") or [] if hasattr(transformers, a)),
        None,
    )
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = cls(cfg) if cls is not None else AutoModel.from_config(cfg)
    except Exception as exc:  # noqa: BLE001 - transformers checks a config in many ways; each is a bad config.json
        reason = (
            "; ".join(ln.strip().rstrip(":") for ln in str(exc).splitlines() if ln.strip())[:300] or type(exc).__name__
        )
        kind = config["model_type"]
        raise ConfigError(f"config.json: transformers cannot build a {kind} model from it: {reason}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    from transformers.pytorch_utils import Conv1D

    linear, conv1d, modules = set(), set(), set()
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            modules.add(name)
        if isinstance(module, torch.nn.Linear):
            linear.add(name)
        elif isinstance(module, Conv1D):
            conv1d.add(name)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_head = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    keep = sorted(
        set(getattr(model, "_keep_in_fp32_modules", None) or ())
        | set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    )
    return ModelFacts(
        type(model).__name__,
        tied,
        tuple(keep),
        frozenset(modules),
        frozenset(linear),
        frozenset(conv1d),
        output_head,
        _saved_names(model),
    )


def _saved_names(model) -> dict[str, str]:
    """``{parameter name in memory: its name in a saved checkpoint}`` for the names transformers renames on save: its
    weight-conversion mapping (``get_model_conversion_mapping``, reversed as ``save_pretrained`` reverses it) applied
    to each state-dict key. Keys that a converter fuses or splits (MoE experts) have no one-to-one name and are left
    out; so are the names saved unchanged."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming, apply_renamings
    except ImportError:  # transformers before its conversion mapping: names are saved as they are in memory
        return {}
    forward = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    reverse = [c.reverse_transform() for c in forward[::-1]]
    renamings = [c for c in reverse if isinstance(c, WeightRenaming)]
    converters = [c for c in reverse if isinstance(c, WeightConverter)]
    saved = {}
    for key in model.state_dict():
        if any(c.rename_source_key(key)[1] is not None for c in converters):
            continue
        name = apply_renamings(key, renamings)
        if name != key:
            saved[key] = name
    return saved


def checkpoint_names(config: Mapping | None, where: str | os.PathLike | None = None) -> dict[str, str]:
    """``{parameter name in memory: name in the checkpoint}`` for ``config``'s model class, where the two differ.

    transformers 5 renames some families' modules in memory but saves and loads the legacy names (ViT:
    ``vit.layers.0.attention.q_proj.weight`` is stored as ``vit.encoder.layer.0.attention.attention.query.weight``;
    LLaVA: ``model.language_model.…`` as ``language_model.model.…``; GPT-NeoX: ``lm_head`` as ``embed_out``), so
    anything named after the model in memory (a PEFT adapter's targets) is matched to a checkpoint through this. Empty
    without a config or for a model type transformers does not know. Imports transformers (seconds)."""
    facts = model_facts(config, where)
    return dict(facts.saved) if facts is not None else {}
