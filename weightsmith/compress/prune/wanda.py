"""Calibration for Wanda and activation-scored structured pruning: input-feature norms ‖X_j‖₂ of every Linear layer.

The model runs block by block, as in Sun et al. 2023 (Wanda): the inputs of block 0 are captured once per sample,
then for each block forward hooks on its Linear layers accumulate Σ x_j² over the calibration tokens, an optional
callback prunes the block (so the next block sees the pruned block's outputs, as the paper's code does), and the
block is run again to produce the next block's inputs. Samples are run one at a time, unpadded, so no padding token
ever enters a norm. Layers outside the blocks (a pooler, an LM head) get their norms from one last full pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class _Stop(Exception):
    """Raised by the capture hook once block 0's inputs are stored."""


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the one whose length is the config's ``num_hidden_layers``."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def _linears(module: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Linear-like submodules (nn.Linear, GPT-2's Conv1D) by full name."""
    return {
        f"{prefix}{name}": m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    }


class _NormHooks:
    """Accumulates Σ over tokens of x_j² for each hooked module's input; ``norms()`` gives √ of it, in float32."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.sumsq: dict[str, Tensor] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])  # (tokens, in)
            acc = self.sumsq.get(name)
            self.sumsq[name] = (x * x).sum(0) if acc is None else acc + (x * x).sum(0)

        return hook

    def close(self) -> dict[str, Tensor]:
        for h in self.handles:
            h.remove()
        return {name: s.sqrt() for name, s in self.sumsq.items()}


def input_norms(
    model: nn.Module,
    samples: list[Tensor],
    prune_block: Callable[[dict[str, nn.Module], dict[str, Tensor]], None] | None = None,
) -> dict[str, Tensor]:
    """‖X_j‖₂ per input feature for every Linear of ``model``: {module name: [in]}.

    ``samples`` are ``input_ids`` tensors [1, T]. ``prune_block(modules, norms)``, if given, is called after each
    block's norms are known and may change that block's weights in place (the model is the caller's own copy).
    """
    block_prefix, blocks = _blocks(model)
    captured: list[tuple[tuple, dict[str, Any]]] = []

    def capture(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        try:
            for ids in samples:
                try:
                    model(input_ids=ids, attention_mask=torch.ones_like(ids))
                except _Stop:
                    pass
        finally:
            handle.remove()
        norms: dict[str, Tensor] = {}
        for i, block in enumerate(blocks):
            modules = _linears(block, f"{block_prefix}.{i}.")
            hooks = _NormHooks(modules)
            for args, kwargs in captured:
                block(*args, **kwargs)
            block_norms = hooks.close()
            norms.update(block_norms)
            if prune_block is not None:
                prune_block(modules, block_norms)
            captured = [_next_inputs(block, args, kwargs) for args, kwargs in captured]
        inside = set(norms)
        outside = {n: m for n, m in _linears(model, "").items() if n not in inside}
        if outside:  # pooler, LM head: one full pass through the (pruned) model
            hooks = _NormHooks(outside)
            for ids in samples:
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
            norms.update(hooks.close())
    return norms


def _next_inputs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Run the block and put its output hidden states where its input hidden states were."""
    out = block(*args, **kwargs)
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
