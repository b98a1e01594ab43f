"""Reading the PEFT adapter types other than LORA, and applying the updates that are not a LoRA product.

Each type becomes the same ``Adapter`` that ``read.read_adapter`` returns for LoRA:

- AdaLoRA and VeRA have a low-rank ΔW: their ``modules`` are ordinary ``LoraModule``s whose ``lora_A``/``lora_B``
  are computed on read by ``LoraForm`` (A ⊙ E for AdaLoRA; Λ_d·A_shared, Λ_b·B_shared for VeRA), so LoRA's own fold,
  unmerge, combine and resize serve them unchanged;
- LoHa and LoKr (full-rank ΔW), IA³ (a scaling), OFT and BOFT (rotations) become ``Update``s in ``adapter.updates``.

``row_kernel`` gives the fold of an update block of rows by block of rows (``math.in_row_blocks_``), so no float32
copy of a weight and no whole ΔW is ever built where the update allows it.

Tensors that are not adapter parts (``modules_to_save``, trained biases, ``base_layer`` copies) replace base tensors
exactly as for LoRA. Types whose effect is not a change of weights are refused with the reason. PEFT is never
imported; key layouts and formulas are PEFT 0.21's (``peft/tuners/<type>/``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from weightsmith.checkpoint import CheckpointView, TensorInfo, TensorSource, provenance_step
from weightsmith.errors import IncompatibleError
from weightsmith.merge.lora import kinds
from weightsmith.merge.lora.math import CONV1D, EMBEDDING, from_rows, stored_factors, to_rows
from weightsmith.merge.lora.read import PREFIX, Adapter, LoraModule, add_replacement, pattern_value

# Why the types that add no weight change cannot be folded (one line each, shown as they are).
NOT_FOLDABLE = {
    "PROMPT_TUNING": "prompt tuning prepends learned virtual-token embeddings to every input; no weight changes",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning prepends learned virtual tokens to every input; no weight "
    "changes",
    "P_TUNING": "p-tuning feeds virtual tokens from a prompt encoder into the input; no weight changes",
    "PREFIX_TUNING": "prefix tuning prepends learned key/value prefixes to every attention layer; no weight changes",
    "ADAPTION_PROMPT": "adaption prompts add gated prompt tokens inside attention; no weight changes",
    "CPT": "context-aware prompt tuning adds learned token embeddings to the input; no weight changes",
    "XLORA": "X-LoRA mixes its LoRA experts with gates computed from each input, so no single weight equals it",
    "POLY": "Poly routes each task through a learned mix of LoRA skills; the mix depends on the task id given with "
    "each input",
    "LILY": "Lily's router mixes its shared B adapters with weights computed from each input, so no single weight "
    "equals it",
    "SHADOW": "ShadowPEFT adapts through a shadow state that evolves with each input, not a change of weights",
    "CARTRIDGE": "a cartridge is a trained key/value cache served as a prefix to every attention layer; no weight "
    "changes",
}
# Types whose update PEFT 0.21 can merge into the weights but weightsmith does not fold (yet): refused with that.
NOT_YET_FOLDED = (
    "ADAMSS",
    "BEFT",
    "C3A",
    "DEFT",
    "DELORA",
    "FOURIERFT",
    "FROD",
    "GLORA",
    "GRALORA",
    "HIRA",
    "HRA",
    "LN_TUNING",
    "MISS",
    "OSF",
    "PEANUT",
    "PSOFT",
    "PVERA",
    "RANDLORA",
    "ROAD",
    "SHIRA",
    "SUPERTUNING",
    "TINYLORA",
    "TRAINABLE_TOKENS",
    "UNILORA",
    "VBLORA",
    "WAVEFT",
)
# Key parts of each supported type (after the module path); any other key replaces a base tensor.
_PARTS = {
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "IA3": ("ia3_l",),
    "OFT": ("oft_R.weight", "oft_embedding_R.weight"),
    "BOFT": ("boft_R", "boft_s"),
}
FOLDED = ("LORA", *_PARTS)
_ADAPTER_PART = re.compile(r"\.(lora_|vera_|hada_|lokr_|ia3_|oft_|boft_)")


@dataclass
class Update:
    """One module of a LoHa/LoKr/IA³/OFT/BOFT adapter: how it changes the weight and which adapter tensors it reads.

    ``out``/``fan_in`` are the row view's sizes (``fan_in`` flattened over a conv kernel) where the adapter fixes
    them; the other comes from the base weight when the fold is planned.
    """

    module: str
    how: str  # "delta" (W + ΔW) | "scale" (W ⊙ l) | "rotate" (W·Rᵀ; BOFT (W·Mᵀ) ⊙ s)
    peft_type: str
    tensors: dict[str, str]  # role -> adapter tensor name
    out: int | None = None
    fan_in: int | None = None
    embedding: bool = False
    scaling: float = 1.0  # α/r for LoHa and LoKr
    columns: bool = False  # IA³ feed-forward: scales the input features
    scales_bias: bool = False  # IA³ attention modules scale the bias too
    options: dict = field(default_factory=dict)  # OFT: block, neumann, terms, coft, eps

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"


class LoraForm(CheckpointView):
    """An AdaLoRA or VeRA adapter seen as the plain LoRA adapter it equals: ``<module>.lora_A.weight`` and
    ``.lora_B.weight`` are computed when read (float32); other tensors pass through."""

    def __init__(self, source: TensorSource, peft_type: str, factors: dict[str, tuple[Callable[[], Tensor], tuple]]):
        super().__init__(source, provenance_step(f"read {peft_type} as LoRA factors", {}, [source]))
        self._factors = factors  # name -> (compute, shape)
        self._order = [*factors, *(n for n in source if _kept(n, peft_type))]

    def __getitem__(self, name: str) -> Tensor:
        if name in self._factors:
            return self._factors[name][0]()
        return self.source[name]

    def info(self, name: str) -> TensorInfo:
        if name in self._factors:
            return TensorInfo(name, self._factors[name][1], torch.float32, "")
        return self.source.info(name)

    def _changed(self, name: str) -> bool:
        return name in self._factors


def _kept(name: str, peft_type: str) -> bool:
    """Source tensors a LoraForm still shows: those that are not the type's own parts."""
    if not name.startswith(PREFIX):
        return False  # VeRA's shared projections
    return not any(name.endswith("." + p) for p in _PARTS[peft_type])


def read_typed(ckpt: TensorSource, cfg: dict, base: TensorSource | None = None) -> Adapter:
    """Parse a non-LORA PEFT adapter (see the module docstring); refuse what cannot be folded, with the reason."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type in NOT_FOLDABLE:
        raise IncompatibleError(
            f"{ckpt.path}: peft_type {cfg.get('peft_type')!r} cannot be folded into weights: {NOT_FOLDABLE[peft_type]}"
        )
    if peft_type not in _PARTS:
        known = "PEFT's merge_and_unload can fold it" if peft_type in NOT_YET_FOLDED else "an unknown PEFT type"
        raise IncompatibleError(
            f"{ckpt.path}: peft_type {cfg.get('peft_type')!r} is not folded by weightsmith ({known}); weightsmith "
            f"folds {', '.join(FOLDED)}"
        )
    if cfg.get("layer_replication"):
        raise IncompatibleError(f"{ckpt.path}: layer_replication (the adapter duplicates base layers) cannot be folded")
    parts: dict[str, dict[str, str]] = {}  # module -> part -> tensor name
    adapter = Adapter(ckpt, cfg)
    duplicates: dict[str, str] = {}
    suffix = re.compile(rf"^(?P<module>.+?)\.(?P<part>{'|'.join(re.escape(p) for p in _PARTS[peft_type])})$")
    for name in ckpt:
        if peft_type == "VERA" and name in ("base_model.vera_A", "base_model.vera_B"):
            continue
        if not name.startswith(PREFIX):
            raise IncompatibleError(f"{ckpt.path}: adapter tensor {name!r} lacks the {PREFIX!r} prefix")
        key = name[len(PREFIX) :]
        match = suffix.match(key)
        if match is not None:
            parts.setdefault(match["module"], {})[match["part"]] = name
        elif _ADAPTER_PART.search(key):
            raise IncompatibleError(f"{ckpt.path}: tensor {name!r} is a {peft_type} part weightsmith cannot fold")
        else:
            add_replacement(adapter, key, name, duplicates)
    for key, name in duplicates.items():
        adapter.replacements.setdefault(key, name)
    odd = [n for n in ckpt if not ckpt.info(n).dtype.is_floating_point]
    if odd:
        raise IncompatibleError(f"{ckpt.path}: adapter tensor {odd[0]!r} is {ckpt.info(odd[0]).dtype}, not a float")
    _READERS[peft_type](adapter, parts, base)
    if not adapter.modules and not adapter.updates and not adapter.replacements:
        raise IncompatibleError(f"{ckpt.path}: adapter holds no tensors")
    return adapter


def _need(adapter: Adapter, module: str, got: dict[str, str], *roles: str) -> None:
    missing = [r for r in roles if r not in got]
    if missing:
        raise IncompatibleError(f"{adapter.path}: module {module!r} lacks {', '.join(missing)}")


def _shape(adapter: Adapter, name: str) -> tuple[int, ...]:
    return tuple(adapter.ckpt.info(name).shape)


def _rank_alpha(adapter: Adapter, module: str, alpha_key: str, default_alpha: float) -> tuple[int, float]:
    cfg = adapter.config
    r = int(pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8)))
    alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get(alpha_key, default_alpha)))
    return r, alpha


def _read_adalora(adapter: Adapter, parts: dict[str, dict[str, str]], base: TensorSource | None) -> None:
    """AdaLoRA: ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``, ``lora_E`` ``[r, 1]``; a saved ``rank_pattern`` has
    already cut the pruned triplets out of the tensors, and ranknum stays ``init_r`` (PEFT copies it back)."""
    cfg, ck = adapter.config, adapter.ckpt
    ranknum = int(cfg.get("init_r") or cfg.get("r") or 0)
    split = kinds.adalora_scaling(float(cfg.get("lora_alpha", 8)), ranknum)  # (α, d)
    factors: dict[str, tuple[Callable[[], Tensor], tuple]] = {}
    for module, got in parts.items():
        _need(adapter, module, got, "lora_A", "lora_B", "lora_E")
        a_shape, b_shape, e_shape = (_shape(adapter, got[p]) for p in ("lora_A", "lora_B", "lora_E"))
        if len(a_shape) != 2 or len(b_shape) != 2 or e_shape != (a_shape[0], 1) or b_shape[1] != a_shape[0]:
            raise IncompatibleError(
                f"{adapter.path}: module {module!r}: lora_A {list(a_shape)}, lora_B {list(b_shape)}, "
                f"lora_E {list(e_shape)} do not fit together"
            )
        if a_shape[0] == 0:  # every triplet pruned by the rank budget: ΔW = 0
            continue
        a_name, b_name = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
        factors[a_name] = (partial(_adalora_a, ck, got["lora_A"], got["lora_E"]), a_shape)
        factors[b_name] = (partial(_float, ck, got["lora_B"]), b_shape)
        adapter.modules[f"{module}.weight"] = LoraModule(
            module, a=a_name, b=b_name, scaling=split[0] / split[1], r=a_shape[0], split_scale=split
        )
    _as_lora(adapter, "ADALORA", factors)


def _adalora_a(ck: TensorSource, a: str, e: str) -> Tensor:
    return kinds.adalora_a(ck[a], ck[e])


def _float(ck: TensorSource, name: str) -> Tensor:
    return ck[name].float()


def _read_vera(adapter: Adapter, parts: dict[str, dict[str, str]], base: TensorSource | None) -> None:
    """VeRA: per layer ``vera_lambda_b`` ``[out]`` and ``vera_lambda_d`` ``[r]``; the shared ``base_model.vera_A``
    ``[r, max in]`` and ``vera_B`` ``[max out, r]`` are saved (``save_projection``, the default) or regenerated from
    ``projection_prng_key``. A layer's input size, which slices A, is read from the base weight."""
    cfg, ck = adapter.config, adapter.ckpt
    if base is None:
        raise IncompatibleError(f"{adapter.path}: a VeRA adapter needs its base model to size its shared projections")
    r = int(cfg.get("r", 256))
    sizes: dict[str, tuple[int, int]] = {}  # module -> (out, in)
    for module, got in parts.items():
        _need(adapter, module, got, "vera_lambda_b", "vera_lambda_d")
        (out,), (rank,) = _shape(adapter, got["vera_lambda_b"]), _shape(adapter, got["vera_lambda_d"])
        weight = _stored_name(base, f"{module}.weight")
        shape = tuple(base.info(weight).shape) if weight in base else ()
        if rank != r or len(shape) != 2 or out not in shape:
            raise IncompatibleError(
                f"{adapter.path}: module {module!r}: lambda_b [{out}], lambda_d [{rank}] (r={r}) do not fit "
                f"base weight {list(shape) or 'missing'}"
            )
        sizes[module] = (out, shape[1] if shape[0] == out else shape[0])
    saved = "base_model.vera_A" in ck and "base_model.vera_B" in ck
    if saved:
        sa, sb = _shape(adapter, "base_model.vera_A"), _shape(adapter, "base_model.vera_B")
    else:
        sa = (r, max(i for _, i in sizes.values()))
        sb = (max(o for o, _ in sizes.values()), r)
        seed = int(cfg.get("projection_prng_key", 0))
    if sa[0] != r or sb[1] != r or any(o > sb[0] or i > sa[1] for o, i in sizes.values()):
        raise IncompatibleError(f"{adapter.path}: vera_A {list(sa)} / vera_B {list(sb)} do not fit its modules")

    def shared() -> tuple[Tensor, Tensor]:
        if saved:
            return ck["base_model.vera_A"], ck["base_model.vera_B"]
        return kinds.vera_projections(seed, r, sa[1], sb[0])

    factors: dict[str, tuple[Callable[[], Tensor], tuple]] = {}
    for module, (out, fan_in) in sizes.items():
        got = parts[module]
        a_name, b_name = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"

        def factor(which: int, g=got, o=out, i=fan_in) -> Tensor:
            a, b = shared()
            return kinds.vera_factors(a, b, ck[g["vera_lambda_d"]], ck[g["vera_lambda_b"]], o, i)[which]

        factors[a_name] = (partial(factor, 0), (r, fan_in))
        factors[b_name] = (partial(factor, 1), (out, r))
        adapter.modules[f"{module}.weight"] = LoraModule(module, a=a_name, b=b_name, scaling=1.0, r=r)
    _as_lora(adapter, "VERA", factors)


def _stored_name(base: TensorSource, weight: str) -> str:
    """``weight`` as the base checkpoint stores it: an adapter names modules as the model has them in memory, which
    transformers 5 saves under legacy names for some families (``architecture.checkpoint_names``; transformers is
    imported only for a name the base lacks)."""
    if weight in base or base.config is None:
        return weight
    from weightsmith.architecture import checkpoint_names

    return checkpoint_names(base.config, base.path).get(weight, weight)


def _as_lora(adapter: Adapter, peft_type: str, factors: dict) -> None:
    adapter.ckpt = LoraForm(adapter.ckpt, peft_type, factors)
    adapter.peft_type = peft_type


def _read_loha(adapter: Adapter, parts: dict[str, dict[str, str]], base: TensorSource | None) -> None:
    """LoHa: ``hada_w{1,2}_a`` ``[out, r]``, ``hada_w{1,2}_b`` ``[r, in·∏k]``; effective conv adds ``hada_t{1,2}``
    ``[r, r, k1, k2]`` with ``hada_w{1,2}_a`` ``[r, out]``, ``hada_w{1,2}_b`` ``[r, in]``. Scale α/r."""
    for module, got in parts.items():
        _need(adapter, module, got, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        w1a, w1b = _shape(adapter, got["hada_w1_a"]), _shape(adapter, got["hada_w1_b"])
        r, alpha = _rank_alpha(adapter, module, "alpha", 8)
        if "hada_t1" in got:
            _need(adapter, module, got, "hada_t2")
            t1 = _shape(adapter, got["hada_t1"])
            out, fan_in, rank = w1a[1], w1b[1] * math.prod(t1[2:]), w1a[0]
            cp = True
        else:
            out, fan_in, rank, cp = w1a[0], w1b[1], w1b[0], False
        if rank != r:
            raise IncompatibleError(f"{adapter.path}: module {module!r} has rank {rank} but the config says {r}")
        adapter.updates[f"{module}.weight"] = Update(
            module, "delta", "LOHA", got, out=out, fan_in=None if cp else fan_in, scaling=alpha / r
        )
    adapter.peft_type = "LOHA"


def _read_lokr(adapter: Adapter, parts: dict[str, dict[str, str]], base: TensorSource | None) -> None:
    """LoKr: W1 (``lokr_w1`` ``[a, c]`` or ``lokr_w1_a·lokr_w1_b``) ⊗ W2 (``lokr_w2`` ``[b, d(, k…)]``,
    ``lokr_w2_a·lokr_w2_b``, or conv ``lokr_t2`` with ``lokr_w2_a`` ``[r, b]``, ``lokr_w2_b`` ``[r, d]``). Scale α/r."""
    for module, got in parts.items():
        if "lokr_w1" not in got:
            _need(adapter, module, got, "lokr_w1_a", "lokr_w1_b")
        if "lokr_w2" not in got:
            _need(adapter, module, got, "lokr_w2_a", "lokr_w2_b")
        w1 = (
            _shape(adapter, got["lokr_w1"])
            if "lokr_w1" in got
            else (_shape(adapter, got["lokr_w1_a"])[0], _shape(adapter, got["lokr_w1_b"])[1])
        )
        if "lokr_w2" in got:
            w2 = _shape(adapter, got["lokr_w2"])
            out, fan_in = w1[0] * w2[0], w1[1] * math.prod(w2[1:])
        elif "lokr_t2" in got:
            t2, w2a, w2b = (_shape(adapter, got[p]) for p in ("lokr_t2", "lokr_w2_a", "lokr_w2_b"))
            out, fan_in = w1[0] * w2a[1], w1[1] * w2b[1] * math.prod(t2[2:])
        else:
            out = w1[0] * _shape(adapter, got["lokr_w2_a"])[0]
            fan_in = w1[1] * _shape(adapter, got["lokr_w2_b"])[1]
        r, alpha = _rank_alpha(adapter, module, "alpha", 8)
        adapter.updates[f"{module}.weight"] = Update(
            module, "delta", "LOKR", got, out=out, fan_in=fan_in, scaling=alpha / r
        )
    adapter.peft_type = "LOKR"


def _feedforward(cfg: dict, module: str) -> bool:
    """PEFT's rule: a string is a regex matched against the whole module name, a list matches name endings."""
    ff = cfg.get("feedforward_modules")
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(t) for t in ff or [])


def _read_ia3(adapter: Adapter, parts: dict[str, dict[str, str]], base: TensorSource | None) -> None:
    """IA³: ``ia3_l`` ``[out, 1]`` (attention: the output is scaled, and the bias with it) or ``[1, in]``
    (feed-forward: the input is scaled); conv ``[1, n, 1, 1]``."""
    for module, got in parts.items():
        shape = _shape(adapter, got["ia3_l"])
        n = math.prod(shape)
        columns = _feedforward(adapter.config, module)
        adapter.updates[f"{module}.weight"] = Update(
            module,
            "scale",
            "IA3",
            got,
            out=None if columns else n,
            fan_in=n if columns else None,
            columns=columns,
            scales_bias=not columns,
        )
    adapter.peft_type = "IA3"


def _read_oft(adapter: Adapter, parts: dict[str, dict[str, str]], base: TensorSource | None) -> None:
    """OFT: ``oft_R.weight`` ``[n, b(b−1)/2]`` (n blocks of size b; n = 1 with ``block_share``), or
    ``oft_embedding_R.weight`` for embeddings (rotating the embedding dimension)."""
    cfg = adapter.config
    options = {
        "neumann": bool(cfg.get("use_cayley_neumann", True)),
        "terms": int(cfg.get("num_cayley_neumann_terms", 5)),
        "coft": bool(cfg.get("coft", False)),
        "eps": float(cfg.get("eps", 6e-5)),
    }
    share = bool(cfg.get("block_share", False))
    for module, got in parts.items():
        embedding = "oft_embedding_R.weight" in got
        name = got["oft_embedding_R.weight" if embedding else "oft_R.weight"]
        n, elements = _shape(adapter, name)
        block = int(round((1 + math.sqrt(1 + 8 * elements)) / 2))
        if block * (block - 1) // 2 != elements:
            raise IncompatibleError(f"{adapter.path}: {name!r} has {elements} elements, not b(b−1)/2 for a block b")
        size = None if share else n * block
        adapter.updates[f"{module}.weight"] = Update(
            module,
            "rotate",
            "OFT",
            {"R": name},
            out=size if embedding else None,
            fan_in=None if embedding else size,
            embedding=embedding,
            options={**options, "block": block},
        )
    adapter.peft_type = "OFT"


def _read_boft(adapter: Adapter, parts: dict[str, dict[str, str]], base: TensorSource | None) -> None:
    """BOFT: ``boft_R`` ``[N, D, H, H]`` (N butterfly factors of D blocks of size H; D·H = the layer's input size,
    flattened over the kernel for conv) and ``boft_s`` ``[out, 1]`` (conv ``[1, out]``), the output scale."""
    for module, got in parts.items():
        _need(adapter, module, got, "boft_R", "boft_s")
        r, scale = _shape(adapter, got["boft_R"]), _shape(adapter, got["boft_s"])
        if len(r) != 4 or r[2] != r[3] or len(scale) != 2 or 1 not in scale:
            raise IncompatibleError(
                f"{adapter.path}: module {module!r}: boft_R {list(r)}, boft_s {list(scale)} do not fit"
            )
        n_factors, blocks, size = r[0], r[1], r[2]
        if n_factors > 1 and (blocks % 2 ** (n_factors - 1) or size % 2):
            raise IncompatibleError(
                f"{adapter.path}: module {module!r}: {blocks} blocks of {size} cannot form {n_factors} "
                f"butterfly factors"
            )
        adapter.updates[f"{module}.weight"] = Update(
            module, "rotate", "BOFT", got, out=math.prod(scale), fan_in=blocks * size, options={"factors": n_factors}
        )
    adapter.peft_type = "BOFT"


_READERS = {
    "ADALORA": _read_adalora,
    "VERA": _read_vera,
    "LOHA": _read_loha,
    "LOKR": _read_lokr,
    "IA3": _read_ia3,
    "OFT": _read_oft,
    "BOFT": _read_boft,
}


# -- planning and applying (called by the fold) -----------------------------------------------------------------------


def probe_shapes(upd: Update, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The update's [out, in] written as LoRA factor shapes (A ``[1, in, *k]``, B ``[out, 1, …]``; embedding A
    ``[1, num]``, B ``[dim, 1]``), its unknown side taken from the base weight ``shape``, so that the fold's one
    orientation rule decides Linear, Conv1D, embedding or conv. None when the base cannot fit."""
    if len(shape) < 2:
        return None
    if upd.embedding:
        dim = upd.out or shape[1]
        return (1, shape[0]), (dim, 1)
    if len(shape) > 2:
        kernel = shape[2:]
        fan_in = upd.fan_in or shape[1] * math.prod(kernel)
        if fan_in % math.prod(kernel):
            return None
        out = upd.out or shape[0]
        return (1, fan_in // math.prod(kernel), *kernel), (out, 1, *(1 for _ in kernel))
    if upd.out is None and upd.fan_in is None:
        return (1, shape[1]), (shape[0], 1)
    if upd.out is None:  # the other side of the base weight: [out, in] (Linear) or [in, out] (Conv1D)
        fan_in = int(upd.fan_in or 0)
        return (1, fan_in), (shape[0] if shape[1] == fan_in else shape[1], 1)
    fan_in = upd.fan_in if upd.fan_in is not None else shape[1] if shape[0] == upd.out else shape[0]
    return (1, fan_in), (upd.out, 1)


def check_invertible(upd: Update, ckpt: TensorSource, weight: float, path) -> None:
    """Refuse an unmerge that cannot be exact: an IA³ factor or a BOFT scale of zero erased what it scaled; BOFT at a
    weight w ≠ 1 mixes W with a rotated and scaled W, whose inverse is no rotation."""
    if upd.how == "scale":
        factor = kinds.ia3_factor(ckpt[upd.tensors["ia3_l"]], weight)
        if bool((factor == 0).any()):
            raise IncompatibleError(
                f"{path}: IA³ vector of {upd.module!r} has zeros (at weight {weight:g}): the fold erased those "
                f"{'columns' if upd.columns else 'rows'}; cannot unmerge"
            )
    if upd.peft_type == "BOFT":
        if weight != 1:
            raise IncompatibleError(
                f"{path}: BOFT module {upd.module!r} folded at weight {weight:g} mixes W with its rotated, rescaled "
                f"copy; only a fold at weight 1 can be unmerged"
            )
        if bool((ckpt[upd.tensors["boft_s"]] == 0).any()):
            raise IncompatibleError(f"{path}: BOFT scale of {upd.module!r} has zeros: the fold erased those rows")


def update_delta(upd: Update, ckpt: TensorSource, kind: str, shape: tuple[int, ...]) -> Tensor:
    """ΔW of a LoHa/LoKr module in the base weight's stored layout ``shape`` (float32)."""
    t = {role: ckpt[name] for role, name in upd.tensors.items()}
    if upd.peft_type == "LOHA":
        delta = kinds.loha_delta(
            t["hada_w1_a"],
            t["hada_w1_b"],
            t["hada_w2_a"],
            t["hada_w2_b"],
            upd.scaling,
            t.get("hada_t1"),
            t.get("hada_t2"),
        )
    else:
        w1 = kinds.lokr_factor(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"))
        w2 = kinds.lokr_factor(t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"))
        delta = kinds.lokr_delta(w1, w2, upd.scaling)
    if kind in (CONV1D, EMBEDDING):  # PEFT builds ΔW as [out, in]: stored transposed
        return from_rows(delta.reshape(-1, shape[0]), kind, shape)
    return delta.reshape(shape)


def apply_update(
    w: Tensor,
    upd: Update,
    ckpt: TensorSource,
    kind: str,
    *,
    weight: float = 1.0,
    inverse: bool = False,
    bias: bool = False,
) -> Tensor:
    """f(W) for a scaling or rotation update (its inverse with ``inverse``, the adapter weight folded in), in the
    stored layout of ``w`` (float32). ``bias`` scales a bias vector (IA³ attention modules)."""
    shape = tuple(w.shape)
    if upd.how == "scale" and bias:
        factor = kinds.ia3_factor(ckpt[upd.tensors["ia3_l"]], weight if inverse else 1.0)
        return w / factor if inverse else w * factor
    kernel = row_kernel(upd, ckpt, kind, shape, weight=weight if inverse else 1.0, inverse=inverse)
    if kernel is not None:  # the stored rows are independent: the whole tensor is one block
        rows = w.reshape(shape[0], -1).clone()
        kernel(rows, 0, shape[0])
        return rows.reshape(shape)
    rows = to_rows(w, kind)  # Conv1D: rotations act along the stored rows' columns
    if upd.peft_type == "BOFT":
        return from_rows(_boft_rows(rows, *_boft_parts(upd, ckpt), inverse=inverse), kind, shape)
    m = kinds.rotation(_oft_blocks(upd, ckpt), right=False, weight_w=weight if inverse else 1.0, inverse=inverse)
    return from_rows(kinds.rotate_by(rows, m), kind, shape)


def _oft_blocks(upd: Update, ckpt: TensorSource) -> Tensor:
    o = upd.options
    return kinds.oft_blocks(
        ckpt[upd.tensors["R"]], o["block"], neumann=o["neumann"], terms=o["terms"], coft=o["coft"], eps=o["eps"]
    )


def _boft_parts(upd: Update, ckpt: TensorSource) -> tuple[Tensor, Tensor]:
    """BOFT's orthogonal blocks ``[N, D, H, H]`` and its output scale ``[out]`` (float32)."""
    return kinds.boft_blocks(ckpt[upd.tensors["boft_R"]]), ckpt[upd.tensors["boft_s"]].float().reshape(-1)


def _boft_rows(rows: Tensor, blocks: Tensor, scale: Tensor, *, inverse: bool) -> Tensor:
    """BOFT on a row view ``[rows, in]`` with its rows' scale: (W·Mᵀ) ⊙ s (PEFT's merge), or (W ⊘ s)·M (its
    unmerge)."""
    if inverse:
        return kinds.boft_rotate(kinds.scale_rows(rows, 1 / scale, columns=False), blocks, inverse=True)
    return kinds.scale_rows(kinds.boft_rotate(rows, blocks), scale, columns=False)


RowKernel = Callable[[Tensor, int, int], None]


def row_kernel(
    upd: Update, ckpt: TensorSource, kind: str, shape: tuple[int, ...], *, weight: float = 1.0, inverse: bool = False
) -> RowKernel | None:
    """The update as an in-place kernel on a float32 block of the stored weight's rows (``math.in_row_blocks_``):
    ``kernel(block, i, j)`` turns rows i..j of W into those of W + w·ΔW (delta), W ⊙ c (IA³, c = 1 + w·(l − 1)) or
    the rotation (OFT, BOFT; ``weight`` and ``inverse`` as in ``apply_update``). None where a block of stored rows
    does not depend on those rows alone: a rotation of a GPT-2 Conv1D weight (stored ``[in, out]``, rotated along
    the input). ``shape`` is the stored weight's. Adapter tensors are read once, when the kernel is made."""
    transposed = kind in (CONV1D, EMBEDDING)  # stored rows are the row view's columns
    if upd.how == "delta":
        return _delta_kernel(upd, ckpt, kind, shape, weight)
    if upd.how == "scale":
        factor = kinds.ia3_factor(ckpt[upd.tensors["ia3_l"]], weight)
        return _scale_kernel(1 / factor if inverse else factor, per_row=upd.columns == transposed)
    if kind == CONV1D:
        return None
    if upd.peft_type == "BOFT":
        blocks, scale = _boft_parts(upd, ckpt)

        def boft(block: Tensor, start: int, stop: int) -> None:
            block.copy_(_boft_rows(block, blocks, scale[start:stop], inverse=inverse))

        return boft
    m = kinds.rotation(_oft_blocks(upd, ckpt), right=kind == EMBEDDING, weight_w=weight, inverse=inverse)

    def oft(block: Tensor, start: int, stop: int) -> None:
        block.copy_(kinds.rotate_by(block, m))

    return oft


def _scale_kernel(factor: Tensor, *, per_row: bool) -> RowKernel:
    """W ⊙ c on stored rows: c per stored row, or per stored column (repeated over a conv kernel's positions, once:
    every block has the same columns)."""
    columns: list[Tensor] = []

    def scale(block: Tensor, start: int, stop: int) -> None:
        if per_row:
            block.mul_(factor[start:stop].unsqueeze(1))
            return
        if not columns:
            columns.append(factor.repeat_interleave(block.shape[1] // factor.numel()).unsqueeze(0).to(block.dtype))
        block.mul_(columns[0])

    return scale


def _delta_kernel(upd: Update, ckpt: TensorSource, kind: str, shape: tuple[int, ...], weight: float) -> RowKernel:
    """W + w·ΔW on stored rows, ΔW's rows computed per block from the factors into one reused buffer
    (``_loha_rows``, ``_lokr_rows``); an effective-conv LoHa (Tucker) is built whole once. Products and roundings
    as PEFT takes them (``kinds.loha_delta``/``lokr_delta``: the product, then the scale, then the sum), in
    float32."""
    t = {role: ckpt[name] for role, name in upd.tensors.items()}
    if upd.peft_type == "LOHA" and "hada_t1" not in t:
        rows = _loha_rows(t, kind, upd.scaling)
    elif upd.peft_type == "LOKR":
        rows = _lokr_rows(t, kind, upd.scaling)
    else:
        whole: list[Tensor] = []

        def rows(block: Tensor, start: int, stop: int) -> Tensor:
            if not whole:
                delta = update_delta(upd, ckpt, kind, shape)
                whole.append(delta.reshape(delta.shape[0], -1))
            return whole[0][start:stop]

    def add(block: Tensor, start: int, stop: int) -> None:
        delta = rows(block, start, stop)
        if weight == 1:
            block += delta
        else:
            block.add_(delta, alpha=weight)

    return add


DeltaRows = Callable[[Tensor, int, int], Tensor]


def _buffer(store: list[Tensor], rows: int, columns: int, dtype: torch.dtype) -> Tensor:
    """A scratch ``[rows, columns]`` tensor, allocated for the first (largest) block and reused for the others."""
    if not store or store[0].shape[0] < rows or store[0].shape[1] != columns or store[0].dtype != dtype:
        store[:] = [torch.empty((rows, columns), dtype=dtype)]
    return store[0][:rows]


def _loha_rows(t: dict[str, Tensor], kind: str, scale: float) -> DeltaRows:
    """LoHa's ΔW rows start..stop: ((W1a·W1b) ⊙ (W2a·W2b))·α/r, the two products of the block's rows only."""
    # stored_factors: (W1a, W1b) or, stored transposed, (W1bᵀ, W1aᵀ)
    l1, r1 = stored_factors(t["hada_w1_b"], t["hada_w1_a"], kind, torch.float32)
    l2, r2 = stored_factors(t["hada_w2_b"], t["hada_w2_a"], kind, torch.float32)
    first: list[Tensor] = []
    second: list[Tensor] = []

    def rows(block: Tensor, start: int, stop: int) -> Tensor:
        p1 = torch.mm(l1[start:stop], r1, out=_buffer(first, stop - start, r1.shape[1], r1.dtype))
        p2 = torch.mm(l2[start:stop], r2, out=_buffer(second, stop - start, r2.shape[1], r2.dtype))
        return p1.mul_(p2).mul_(scale)

    return rows


def _lokr_rows(t: dict[str, Tensor], kind: str, scale: float) -> DeltaRows:
    """LoKr's ΔW rows start..stop of W1 ⊗ W2 (``w1`` ``[a, c]``, ``w2`` ``[b, d(, k…)]``): stored row i·b + k is
    W1[i, ·] ⊗ W2[k, ·], so with each factor's rows laid out once per stored row (``[a·b, c]`` and ``[a·b, d·∏k]``,
    a small fraction of the weight) a block is one broadcast product of two slices into a buffer (no Kronecker product
    of whole W1 rows that a block cuts through), then scaled by α/r."""
    w1 = kinds.lokr_factor(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"))
    w2 = kinds.lokr_factor(t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"))
    if kind in (CONV1D, EMBEDDING):  # (W1 ⊗ W2)ᵀ = W1ᵀ ⊗ W2ᵀ
        w1, w2 = w1.t(), w2.t()
    a, b = w1.shape[0], w2.shape[0]
    dtype = torch.promote_types(w1.dtype, w2.dtype)
    left = w1.to(dtype).repeat_interleave(b, dim=0).unsqueeze(2)  # [a·b, c, 1]: row i·b + k is W1[i]
    right = w2.to(dtype).reshape(b, -1).repeat(a, 1).unsqueeze(1)  # [a·b, 1, d·∏k]: row i·b + k is W2[k]
    scratch: list[Tensor] = []

    def rows(block: Tensor, start: int, stop: int) -> Tensor:
        n = stop - start
        out = _buffer(scratch, n, left.shape[1] * right.shape[2], dtype).view(n, left.shape[1], right.shape[2])
        torch.mul(left[start:stop], right[start:stop], out=out)
        return out.view(n, -1).mul_(scale)

    return rows
