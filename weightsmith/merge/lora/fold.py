"""PEFT LoRA adapters folded into a base checkpoint without a model instance: ``open_folded`` (a lazy folded view),
``merge`` (that view streamed to disk), ``unmerge`` (the inverse for plain LoRA) and ``extract`` (ΔW → adapter).

For each base tensor the fold computes, in float32, rounding once to the output dtype:

    W' = W + Σᵢ wᵢ·(fᵢ(W) − W)

where fᵢ is adapter i's own merge, exactly as PEFT's ``merge_and_unload`` defines it (peft 0.21, lora/layer.py):
plain LoRA fᵢ(W) = W + s·B·A (so the term is s·B·A, computed directly); DoRA fᵢ(W) = m/‖W + s·B·A‖_row·(W + s·B·A);
a saved whole tensor (``modules_to_save``, trained biases, ``base_layer`` weights) fᵢ(W) = Rᵢ, applied first so that
LoRA factors add to it, as they do in PEFT; ``lora_bias`` adds s·bias_B to the base bias. A single adapter of weight 1
gives fᵢ(W) itself, with no subtraction. Several adapters are applied each to the same base and their changes
summed (PEFT instead stacks them one after another, rounding in between, and its ``add_weighted_adapter`` mishandles
rsLoRA, lora_bias and DoRA: peft issue #3761).

Only torch and safetensors are imported; never transformers or peft.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from weightsmith.architecture import is_conv1d, model_type
from weightsmith.checkpoint import DEFAULT_SHARD_SIZE, CheckpointView, TensorInfo, TensorSource, provenance_step
from weightsmith.checkpoint.files import read_span
from weightsmith.conversion import as_checkpoint
from weightsmith.errors import ConfigError, IncompatibleError, NumericalError
from weightsmith.inspection import change_figures
from weightsmith.merge.lora.math import (
    CONV,
    CONV1D,
    EMBEDDING,
    LINEAR,
    add_lora_,
    add_product_,
    block_rows,
    dora_rows,
    from_rows,
    in_row_blocks_,
    lora_delta_rows,
    stored_factors,
    to_rows,
)
from weightsmith.merge.lora.peft_types import (
    RowKernel,
    Update,
    apply_update,
    check_invertible,
    probe_shapes,
    row_kernel,
    update_delta,
)
from weightsmith.merge.lora.quantized import dequantized
from weightsmith.merge.lora.read import Adapter, LoraModule, check_finite, read_adapter, to_checkpoint_names
from weightsmith.numerics import all_finite
from weightsmith.report import Report, figures_requested
from weightsmith.stream import Item, Rows, Stored, Written, compute_threads, stream
from weightsmith.units import format_size, parse_dtype

AdapterSpec = TensorSource | str | os.PathLike | tuple[TensorSource | str | os.PathLike, float]


@dataclass
class _Term:
    """One adapter's contribution to one base tensor."""

    how: str  # "replace" | "lora" | "dora" | "bias" | "delta" | "scale" | "rotate"
    adapter: Adapter
    weight: float
    module: LoraModule | None = None
    kind: str = LINEAR  # row-view kind for lora/dora and the other types' updates
    tensor: str | None = None  # adapter tensor name for "replace"
    update: Update | None = None  # LoHa/LoKr ("delta"), IA³ ("scale"), OFT ("rotate")
    inverse: bool = False  # unmerge of a scale or rotation: its inverse, at ``weight``
    on_bias: bool = False  # IA³ scaling a bias

    @property
    def lora(self) -> LoraModule:
        assert self.module is not None  # lora, dora and bias terms carry their module
        return self.module

    @property
    def replacement(self) -> str:
        assert self.tensor is not None  # replace terms name their tensor
        return self.tensor


# Updates that are not W + ΔW: f(W) is computed whole (weighted: W + w·(f(W) − W)).
_NONLINEAR = ("dora", "scale", "rotate")


class FoldedCheckpoint(CheckpointView):
    """A base checkpoint with adapters folded in, lazily: ``folded[name]`` reads and folds that tensor only.

    A CheckpointView, so a fold streams straight into the next step. All checks
    happen when it is opened; reading a tensor can only fail on NaN/Inf in a result.
    """

    def __init__(
        self,
        base: TensorSource,
        adapters: Sequence[tuple[Adapter, float]],
        *,
        dtype: torch.dtype | None = None,
        invert: bool = False,
    ):
        params = {"adapters": [[str(a.path), w] for a, w in adapters], "dtype": str(dtype or "")}
        super().__init__(
            base,
            provenance_step("lora unmerge" if invert else "lora merge", params, [base, *(a.ckpt for a, _ in adapters)]),
        )
        self.base, self.adapters, self.dtype, self.invert = base, list(adapters), dtype, invert
        self._source: dict[str, str] = {n: n for n in base}  # output name -> base tensor it starts from
        self._terms: dict[str, list[_Term]] = {}
        targets = {
            n
            for a, _ in self.adapters
            for n in (
                *a.modules,
                *a.replacements,
                *a.updates,
                *(f"{m.module}.bias" for m in a.modules.values() if m.bias),
            )
        }
        self.untied: list[str] = []
        self._tied: dict[str, str] = {}
        for head, embed in base.tied_weights.items():
            if head in targets or embed in targets:  # the fold makes them differ: write both
                self._source[head] = embed
                self.untied.append(head)
            else:
                self._tied[head] = embed
        self._order = list(self._source)
        for adapter, weight in self.adapters:
            self._plan(adapter, weight)
        self.config = _untied_config(base.config) if self.untied and base.config is not None else base.config

    # -- planning (shapes only, no data) --------------------------------------------------------------------------

    def _plan(self, adapter: Adapter, weight: float) -> None:
        missing, misfit = [], []
        for name, tensor in adapter.replacements.items():
            if self.invert and (name in adapter.modules or name in adapter.updates):
                continue  # a targeted module's saved base_layer weight: the LoRA term alone is undone
            if name not in self._source:
                missing.append(name)
            elif self._info(name).shape != adapter.ckpt.info(tensor).shape:
                misfit.append(f"{name} {list(adapter.ckpt.info(tensor).shape)} vs {list(self._info(name).shape)}")
            else:
                self._terms.setdefault(name, []).append(_Term("replace", adapter, weight, tensor=tensor))
        if self.invert:
            replaced = [n for n in adapter.replacements if n not in adapter.modules and n not in adapter.updates]
            if replaced:
                raise IncompatibleError(
                    f"{adapter.path}: replaces {len(replaced)} base tensor(s) (modules_to_save or trained biases, "
                    f"e.g. {replaced[0]!r}) whose original values are not in the adapter; cannot unmerge"
                )
            if adapter.dora:
                raise IncompatibleError(
                    f"{adapter.path}: DoRA cannot be unmerged (the fold rescales rows by a norm "
                    f"of the original weight, which the merged checkpoint no longer holds)"
                )
        for name, mod in adapter.modules.items():
            if name not in self._source:
                missing.append(name)
                continue
            kind = self._kind(adapter, mod, self._info(name).shape)
            if kind is None:
                a, b = (list(adapter.ckpt.info(t).shape) for t in mod.factors)
                misfit.append(f"{name} {list(self._info(name).shape)} vs lora_A {a}, lora_B {b}")
                continue
            if mod.magnitude is not None:
                out = to_rows(torch.empty(self._info(name).shape, device="meta"), kind).shape[0]
                m_shape = adapter.ckpt.info(mod.magnitude).shape  # [out], or [1, out, 1, 1] for conv
                if [d for d in m_shape if d != 1] != [out] and m_shape != (out,):
                    misfit.append(f"{mod.magnitude} {list(m_shape)} vs [{out}]")
                    continue
            how = "dora" if mod.magnitude is not None else "lora"
            self._terms.setdefault(name, []).append(_Term(how, adapter, weight, mod, kind))
            if mod.bias is not None:
                bias = f"{mod.module}.bias"
                if bias not in self._source:
                    missing.append(f"{bias} (lora_bias needs a base bias)")
                elif self._info(bias).shape != adapter.ckpt.info(mod.bias).shape:
                    misfit.append(f"{bias} {list(self._info(bias).shape)} vs {list(adapter.ckpt.info(mod.bias).shape)}")
                else:
                    self._terms.setdefault(bias, []).append(_Term("bias", adapter, weight, mod))
        for name, upd in adapter.updates.items():
            if name not in self._source:
                missing.append(name)
                continue
            kind = self._update_kind(adapter, upd, self._info(name).shape)
            if kind is None:
                misfit.append(
                    f"{name} {list(self._info(name).shape)} vs {upd.peft_type} {upd.out or '?'}×{upd.fan_in or '?'}"
                )
                continue
            # an unmerge subtracts a ΔW (negative weight) but inverts a scaling or rotation at the original weight
            inverse = self.invert and upd.how != "delta"
            w = -weight if inverse else weight
            if inverse:
                check_invertible(upd, adapter.ckpt, w, adapter.path)
            self._terms.setdefault(name, []).append(_Term(upd.how, adapter, w, kind=kind, update=upd, inverse=inverse))
            bias = f"{upd.module}.bias"
            if upd.scales_bias and bias in self._source:
                term = _Term(upd.how, adapter, w, kind=kind, update=upd, inverse=inverse, on_bias=True)
                self._terms.setdefault(bias, []).append(term)
        for problems, what in ((missing, "target(s) missing from the base"), (misfit, "shape(s) that do not fit")):
            if problems:
                more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
                raise IncompatibleError(
                    f"{adapter.path}: {len(problems)} {what} {self.base.path}: {', '.join(problems[:3])}{more}"
                )
        for name, terms in self._terms.items():
            if not self._info(name).dtype.is_floating_point and any(t.adapter is adapter for t in terms):
                raise IncompatibleError(
                    f"{self.base.path}: tensor {name!r} is {self._info(name).dtype}, not a "
                    f"floating-point weight; an adapter cannot be folded into it"
                )

    def _kind(self, adapter: Adapter, mod: LoraModule, shape: tuple[int, ...]) -> str | None:
        """Orientation from the base weight's shape (PEFT's saved ``fan_in_fan_out`` is not reliable)."""
        a, b = (adapter.ckpt.info(t).shape for t in mod.factors)
        if len(b) < 2 or a[0] != b[1] or len(a) < 2:
            return None
        if mod.embedding:  # A [r, num], B [dim, r], base [num, dim]
            return EMBEDDING if shape == (a[1], b[0]) and len(a) == len(b) == 2 else None
        out, fan_in = b[0], a[1]
        if len(a) > 2 or len(shape) > 2:  # ConvNd: A [r, in, *k], B [out, r, 1, …], base [out, in, *k]
            fits = shape == (out, fan_in, *a[2:]) and all(d == 1 for d in b[2:]) and len(b) == len(a)
            return CONV if fits else None
        if len(b) != 2:
            return None
        if out != fan_in:
            return LINEAR if shape == (out, fan_in) else CONV1D if shape == (fan_in, out) else None
        if shape != (out, fan_in):
            return None
        if model_type(self.base.config) is None:  # no config: the adapter's own flag is all there is
            return CONV1D if adapter.config.get("fan_in_fan_out") else LINEAR
        return CONV1D if is_conv1d(self.base.config, mod.module) else LINEAR  # square: the shape cannot tell

    def _update_kind(self, adapter: Adapter, upd: Update, shape: tuple[int, ...]) -> str | None:
        """Orientation of a LoHa/LoKr/IA³/OFT update by the same rule as LoRA's: its [out, in] posed as factor
        shapes to ``_kind``."""
        probe = probe_shapes(upd, tuple(shape))
        if probe is None:
            return None
        shapes = {"a": probe[0], "b": probe[1]}
        ckpt = SimpleNamespace(info=lambda n: SimpleNamespace(shape=shapes[n]))
        stand_in = SimpleNamespace(ckpt=ckpt, config=adapter.config)
        return self._kind(stand_in, LoraModule(upd.module, a="a", b="b", embedding=upd.embedding), shape)  # type: ignore[arg-type]

    def _info(self, name: str) -> TensorInfo:
        return self.base.info(self._source[name])  # as stored in the base (``info`` gives it as folded)

    # -- Mapping --------------------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._source:
            raise KeyError(name)
        value = self.base[self._source[name]]
        terms = self._terms.get(name)
        target = self.info(name).dtype
        if not terms:
            return value if value.dtype == target else value.to(target)
        value = self._fold(value, terms, target)  # rounded once, to the output dtype
        if not all_finite(value):  # checked as stored: an overflow of the output dtype counts
            raise self._not_finite(name, terms)
        return value

    def rows(self, name: str) -> Rows | None:
        """Tensor ``name`` folded a block of rows at a time (``stream.Rows``), each block read from the base file
        straight into the writer's buffer and folded there: no buffer the size of the weight is made, so a fold
        streams through the same few megabytes whatever the model. The same kernels and block boundaries as
        ``folded[name]``, so the same bytes. None where that read cannot serve: a tensor the fold leaves unchanged,
        one whose fold needs the whole weight (``_row_kernels``), one the base does not store raw (``location``)."""
        terms = self._terms.get(name)
        if not terms:
            return None
        stored, location = self._info(name), self.base.location(self._source[name])
        if location is None or len(stored.shape) < 2:
            return None
        kernels = self._row_kernels(terms, stored.shape, stored.dtype)
        if kernels is None:
            return None
        path, offset, _ = location
        columns = math.prod(stored.shape[1:])
        row_bytes = columns * stored.dtype.itemsize
        target = self.info(name).dtype
        unchanged = functools.partial(self.base.check_unchanged, self._source[name])

        def apply(block: Tensor, start: int, stop: int, first: int) -> None:
            for kernel in kernels:
                kernel(block, first + start, first + stop)

        def fill(out: Tensor, start: int, stop: int) -> None:
            # the stored rows land in ``out`` itself when the dtypes agree, and are folded there
            src = out if stored.dtype == target else torch.empty((stop - start, columns), dtype=stored.dtype)
            read_span(path, offset + start * row_bytes, src, unchanged, f"tensor {self._source[name]!r}")
            in_row_blocks_(src, out, functools.partial(apply, first=start))
            if not all_finite(out):
                raise self._not_finite(name, terms)

        return Rows(stored.shape, target, fill, unit=block_rows(columns))

    def _not_finite(self, name: str, terms: list[_Term]) -> NumericalError:
        adapters = ", ".join(sorted({str(t.adapter.path) for t in terms}))
        return NumericalError(f"{self.base.path}: folding {adapters} into tensor {name!r} gives NaN or Inf")

    def _fold(self, w: Tensor, terms: list[_Term], target: torch.dtype) -> Tensor:
        kernels = self._row_kernels(terms, tuple(w.shape), w.dtype)
        if kernels is not None:  # the common case: from the stored weight straight to the output, rows by rows
            out = w if w.dtype == target else torch.empty(w.shape, dtype=target)  # w is our own copy

            def apply(block: Tensor, start: int, stop: int) -> None:
                for kernel in kernels:
                    kernel(block, start, stop)

            in_row_blocks_(w.reshape(w.shape[0], -1), out.reshape(out.shape[0], -1), apply)
            return out
        acc_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        w = w.to(acc_dtype)  # fp32 accumulate; the stored tensor is cast once, at the end. A fresh tensor: ours
        replace = [t for t in terms if t.how == "replace"]
        others = [t for t in terms if t.how != "replace"]
        if len(replace) == 1 and replace[0].weight == 1:
            w = replace[0].adapter.ckpt[replace[0].replacement].to(acc_dtype)  # exactly the saved tensor
        elif replace:
            for t in replace:
                w = w + t.weight * (t.adapter.ckpt[t.replacement].to(acc_dtype) - w)
        if len(others) == 1 and others[0].how in _NONLINEAR and (others[0].weight == 1 or others[0].inverse):
            result = self._apply(w, others[0])
        else:
            nonlinear = [t for t in others if t.how in _NONLINEAR]
            result = w.clone() if nonlinear else w  # these terms need the unchanged W; otherwise add in place
            for t in others:
                if t.how in _NONLINEAR:
                    result += t.weight * (self._apply(w, t) - w)
                elif t.how == "delta":
                    assert t.update is not None
                    result += t.weight * update_delta(t.update, t.adapter.ckpt, t.kind, tuple(w.shape)).to(acc_dtype)
                elif t.how == "bias":
                    bias = t.lora.bias
                    assert bias is not None  # a bias term's module has a trained bias
                    result += (t.lora.scaling * t.weight) * t.adapter.ckpt[bias].to(acc_dtype)
                else:
                    self._add_lora(result, result, [t])
        return result.to(target)

    @staticmethod
    def _row_kernels(terms: list[_Term], shape: tuple[int, ...], dtype: torch.dtype) -> list[RowKernel] | None:
        """Block-of-rows kernels (``in_row_blocks_``) for terms that need no whole copy of W: any number of LoRA and
        LoHa/LoKr terms (each adds its ΔW), or one scaling or rotation on its own at weight 1 (or undone). None
        for the rest (DoRA's row norms, replaced tensors, a bias, mixes with a non-additive term)."""
        kernels: list[RowKernel] = []
        if len(terms) == 1 and terms[0].how in ("scale", "rotate") and not terms[0].on_bias:
            t = terms[0]
            if t.weight != 1 and not t.inverse:
                return None
            assert t.update is not None
            kernel = row_kernel(t.update, t.adapter.ckpt, t.kind, shape, weight=t.weight, inverse=t.inverse)
            return None if kernel is None else [kernel]
        lora = [t for t in terms if t.how == "lora"]
        if len(lora) + sum(t.how == "delta" for t in terms) != len(terms):
            return None
        if lora:
            acc = torch.float64 if dtype == torch.float64 else torch.float32  # in_row_blocks_' block dtype
            factors = [_lora_factors(t, acc) for t in lora]
            scratch: list[Tensor] = []

            def add(block: Tensor, start: int, stop: int) -> None:
                for left, right, scale, divisor in factors:
                    add_product_(block, left[start:stop], right, scale, divisor, scratch)

            kernels.append(add)
        for t in terms:
            if t.how == "delta":
                assert t.update is not None
                delta = row_kernel(t.update, t.adapter.ckpt, t.kind, shape, weight=t.weight)
                assert delta is not None  # every ΔW has a row kernel
                kernels.append(delta)
        return kernels

    @staticmethod
    def _add_lora(src: Tensor, dst: Tensor, terms: list[_Term]) -> None:
        acc = torch.float64 if src.dtype == torch.float64 else torch.float32
        factors = [_lora_factors(t, acc) for t in terms]
        add_lora_(src.reshape(src.shape[0], -1), dst.reshape(dst.shape[0], -1), factors)

    def _apply(self, w: Tensor, t: _Term) -> Tensor:
        """f(W) of a DoRA, scaling or rotation term (an inverse one undoes its fold at its weight)."""
        if t.how == "dora":
            return self._dora(w, t)
        assert t.update is not None
        out = apply_update(w, t.update, t.adapter.ckpt, t.kind, weight=t.weight, inverse=t.inverse, bias=t.on_bias)
        return out.to(w.dtype)

    @staticmethod
    def _dora(w: Tensor, t: _Term) -> Tensor:
        ck, mod = t.adapter.ckpt, t.lora
        assert mod.magnitude is not None  # a DoRA term's module has its magnitude vector
        a, b = mod.factors
        delta = lora_delta_rows(ck[a], ck[b], mod.scaling)  # [out, in]; DoRA's norm needs the full ΔW
        rows = dora_rows(to_rows(w, t.kind), delta.to(w.dtype), ck[mod.magnitude].reshape(-1))
        return from_rows(rows.to(w.dtype), t.kind, tuple(w.shape))

    def __contains__(self, name: object) -> bool:
        return name in self._source

    def __repr__(self) -> str:
        return f"FoldedCheckpoint({str(self.path)!r} + {len(self.adapters)} adapter(s), {len(self)} tensors)"

    # -- facts without reading ------------------------------------------------------------------------------------

    def _source_name(self, name: str) -> str:
        return self._source[name]

    def _changed(self, name: str) -> bool:
        return name in self._terms

    @property
    def tied_weights(self) -> dict[str, str]:
        return self._tied

    @property
    def inputs(self) -> list[TensorSource]:
        """The checkpoints this view reads (for provenance)."""
        return [self.base, *(a.ckpt for a, _ in self.adapters)]

    @property
    def changed(self) -> dict[str, list[str]]:
        """{tensor name: how each adapter changes it} for every tensor the fold touches."""
        return {n: [t.how for t in terms] for n, terms in self._terms.items()}


def _lora_factors(t: _Term, acc: torch.dtype) -> tuple[Tensor, Tensor, float, float | None]:
    """A LoRA term as ``add_product_`` takes it: stored factors (L, R), scale and divisor, the adapter weight folded
    into the scale (AdaLoRA at weight 1: α and d one after the other, as PEFT rounds them)."""
    a, b = t.lora.factors
    left, right = stored_factors(t.adapter.ckpt[a], t.adapter.ckpt[b], t.kind, acc)
    if t.lora.split_scale is not None and t.weight == 1:
        return left, right, *t.lora.split_scale
    return left, right, t.lora.scaling * t.weight, None


def _untied_config(config: dict) -> dict:
    out = dict(config)
    out["tie_word_embeddings"] = False
    if isinstance(out.get("text_config"), dict):  # multimodal configs keep the flag in their text part
        out["text_config"] = {**out["text_config"], "tie_word_embeddings": False}
    return out


def _adapter_specs(
    adapters: Sequence[AdapterSpec] | AdapterSpec,
) -> list[tuple[TensorSource | str | os.PathLike, float]]:
    if isinstance(adapters, (str, os.PathLike, TensorSource)) or (
        isinstance(adapters, tuple) and len(adapters) == 2 and isinstance(adapters[1], (int, float))
    ):
        adapters = [adapters]
    specs = []
    for item in adapters:
        src, weight = item if isinstance(item, tuple) else (item, 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"adapter {src}: weight {weight!r} is not a number") from None
        if not math.isfinite(weight):
            raise ConfigError(f"adapter {src}: weight {weight} is not finite")
        specs.append((src, weight))
    if not specs:
        raise ConfigError("no adapters given")
    return specs


def open_folded(
    base: TensorSource | str | os.PathLike,
    adapters: Sequence[tuple[TensorSource | str | os.PathLike, float]] | Sequence[AdapterSpec],
    *,
    dtype: str | torch.dtype | None = None,
) -> FoldedCheckpoint:
    """``base`` with PEFT LoRA ``adapters`` [(path, weight), …] folded in, as a lazy read-only tensor dict.

    Validated now (targets present, shapes fit, adapter type foldable, adapters finite); each tensor is folded when
    read. ``dtype`` sets the dtype float tensors come out in (default: each base tensor's own).

    >>> folded = ws.lora.open_folded("llama", [("adapter", 1.0)])       # doctest: +SKIP
    >>> folded["model.layers.0.self_attn.q_proj.weight"].shape          # doctest: +SKIP
    """
    return _open(base, adapters, dtype=dtype, invert=False)


def _open(base, adapters, *, dtype, invert: bool) -> FoldedCheckpoint:
    ckpt = as_checkpoint(base)
    if ckpt.is_adapter:
        raise IncompatibleError(f"{ckpt.path}: is a PEFT adapter; the first input must be the base model")
    ckpt = dequantized(ckpt)  # a quantized (NF4, int8) base folds into the weights it stands for
    parsed = []
    for src, weight in _adapter_specs(adapters):
        adapter = read_adapter(src, base=ckpt)
        check_finite(adapter)
        _match_names(adapter, ckpt)
        parsed.append((adapter, -weight if invert else weight))
    return FoldedCheckpoint(ckpt, parsed, dtype=parse_dtype(dtype), invert=invert)


def _match_names(adapter: Adapter, base: TensorSource) -> None:
    """Targets named as transformers 5 has the model in memory (``vit.layers.0.attention.q_proj``) matched to the
    legacy names the base checkpoint stores (``vit.encoder.layer.0.attention.attention.query``). transformers is
    imported only when some target is missing from the base and the base has a config."""
    present = {*base, *base.tied_weights}
    if base.config is None or all(n in present for n in (*adapter.modules, *adapter.replacements, *adapter.updates)):
        return
    from weightsmith.architecture import checkpoint_names

    to_checkpoint_names(adapter, present, checkpoint_names(base.config, base.path))


def _stream(folded: FoldedCheckpoint, out, operation: str, params: dict, *, shard_size, force) -> Report:
    figures = figures_requested()
    figure_rows: list[dict] = []

    def fold(name: str) -> list[Item]:
        if figures and folded._changed(name):  # ‖ΔW‖/‖W‖ and cosine for the report's pictures
            tensor = folded[name]
            figure_rows.append({"name": name, **change_figures(folded.base[folded._source_name(name)], tensor)})
            return [(name, tensor)]
        return [(name, folded.rows(name) or Stored(folded, name))]

    with compute_threads():  # two cores, a rank-16 LoRA into a 1.07 GB base: 4.9 → 4.1 s (medians of three)
        report = stream(
            folded,
            out,
            operation=operation,
            params=params,
            transform=fold,
            inputs=folded.inputs,
            dtype=folded.dtype,
            shard_size=shard_size,
            force=force,
            summary=lambda written: _fold_summary(folded, written),
        )
    if figures:
        report.figures["tensors"] = figure_rows
    if folded.untied:
        report.notes.append(
            f"{', '.join(folded.untied)} now differ from the input embedding: written separately, "
            f"tie_word_embeddings set to false"
        )
    report.tensors = [{"name": n, "how": "+".join(h)} for n, h in folded.changed.items()]
    return report


def _fold_summary(folded: FoldedCheckpoint, written: Written) -> dict:
    """The headline of a fold: inputs, tensors changed and how, what was written."""
    counts: dict[str, int] = {}
    for hows in folded.changed.values():
        for how in set(hows):
            counts[how] = counts.get(how, 0) + 1
    return dict(
        base=str(folded.base.path),
        adapters=[f"{a.path}@{-w if folded.invert else w:g}" for a, w in folded.adapters],
        tensors=len(folded),
        changed=len(folded.changed),
        lora=counts.get("lora", 0),
        dora=counts.get("dora", 0),
        replaced=counts.get("replace", 0),
        lora_bias=counts.get("bias", 0),
        **{how: counts[how] for how in ("delta", "scale", "rotate") if how in counts},
        types=sorted({a.peft_type for a, _ in folded.adapters}),
        untied=folded.untied or None,
        bytes_out=format_size(written.bytes),
        shards=written.shards,
    )


def merge(
    base: TensorSource | str | os.PathLike,
    adapters: Sequence[AdapterSpec] | AdapterSpec,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
    requantize: bool = False,
) -> Report:
    """Fold PEFT adapters into ``base`` and write a plain checkpoint, one tensor at a time.

    W' = W + Σᵢ wᵢ·(fᵢ(W) − W) (module docstring; ``peft_types`` for the types other than LoRA); matches PEFT's
    ``merge_and_unload``. ``adapters`` are paths or (path, weight) pairs. A quantized base (NF4, int8) is folded
    into its dequantized weights and written in float, or in its own scheme again with ``requantize``
    (``quantized`` explains the routes). Peak memory: a few tensors, never the model.

    >>> ws.lora.merge("llama", ["adapter"], "merged")                           # doctest: +SKIP
    >>> ws.lora.merge("llama", [("math", 0.7), ("code", 0.3)], "merged", dtype="bf16")  # doctest: +SKIP
    """
    folded = open_folded(base, _adapter_specs(adapters), dtype=dtype)
    params = {
        "adapters": [[str(a.path), w] for a, w in folded.adapters],
        "dtype": str(folded.dtype or ""),
        "shard_size": shard_size,
    }
    if requantize:
        from weightsmith.merge.lora.quantized import merge_requantized

        return merge_requantized(folded, out, params, shard_size=shard_size, force=force)
    return _stream(folded, out, "lora merge", params, shard_size=shard_size, force=force)


def unmerge(
    merged: TensorSource | str | os.PathLike,
    adapter: TensorSource | str | os.PathLike | tuple,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    force: bool = False,
) -> Report:
    """Undo a plain-LoRA fold: W = W' − w·s·B·A (and b = b' − w·s·bias_B for lora_bias).

    Exact up to float rounding for fp32 checkpoints. Refused for DoRA (the row norms of the original weight are
    gone) and for adapters that replace whole tensors (modules_to_save, trained biases: the originals are gone).

    >>> ws.lora.unmerge("merged", "adapter", "base_again")  # doctest: +SKIP
    """
    folded = _open(merged, _adapter_specs(adapter), dtype=dtype, invert=True)
    params = {
        "adapters": [[str(a.path), -w] for a, w in folded.adapters],
        "dtype": str(folded.dtype or ""),
        "shard_size": shard_size,
    }
    return _stream(folded, out, "lora unmerge", params, shard_size=shard_size, force=force)


def extract(
    base: TensorSource | str | os.PathLike,
    tuned: TensorSource | str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    force: bool = False,
) -> Report:
    """Truncated-SVD LoRA of ``tuned − base`` written as a PEFT adapter (see ``extraction.extract``)."""
    from weightsmith.merge.lora.extraction import extract as _extract

    return _extract(base, tuned, out, rank=rank, energy=energy, force=force)


__all__ = ["FoldedCheckpoint", "extract", "merge", "open_folded", "unmerge"]
