"""PEFT adapters without a model instance: ``merge`` folds adapters (LoRA, DoRA, AdaLoRA, IA³, LoHa, LoKr, VeRA,
OFT, BOFT) into a base checkpoint tensor by tensor, ``unmerge`` undoes a fold, ``extract`` turns a fine-tune into a LoRA
adapter, ``combine`` makes one adapter of several, ``resize`` changes an adapter's rank, ``open_folded`` gives the fold
as a lazy tensor dict.

    import weightsmith as ws
    ws.lora.merge("llama", ["adapter"], "merged")

Modules: ``read`` (adapter files → what changes which base tensor), ``peft_types`` (the other PEFT types),
``math`` and ``kinds`` (pure tensor math), ``fold`` (the lazy folded view and the merge/unmerge verbs),
``extraction`` (fine-tune → adapter), ``combination`` (adapters → adapter: combine, resize), ``quantized``
(QLoRA adapters and NF4/int8 bases: ``routes`` measures the ways to fold them).
"""

from __future__ import annotations

from weightsmith.merge.lora.combination import combine, resize
from weightsmith.merge.lora.fold import FoldedCheckpoint, extract, merge, open_folded, unmerge
from weightsmith.merge.lora.quantized import routes

__all__ = ["FoldedCheckpoint", "combine", "extract", "merge", "open_folded", "resize", "routes", "unmerge"]
