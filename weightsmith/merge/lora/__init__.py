"""PEFT adapters without a model instance: ``merge`` folds adapters into a base checkpoint tensor by tensor,
``unmerge`` undoes a fold, ``extract`` turns a fine-tune into a LoRA adapter, ``open_folded`` gives the fold as a lazy
tensor dict.

    import weightsmith as ws
    ws.lora.merge("llama", ["adapter"], "merged")

Modules: ``read`` (adapter files → what changes which base tensor), ``math`` (pure tensor math), ``fold`` (the lazy
folded view and the merge/unmerge verbs), ``extraction`` (fine-tune → adapter).
"""

from __future__ import annotations

from weightsmith.merge.lora.fold import FoldedCheckpoint, extract, merge, open_folded, unmerge

__all__ = ["FoldedCheckpoint", "extract", "merge", "open_folded", "unmerge"]
