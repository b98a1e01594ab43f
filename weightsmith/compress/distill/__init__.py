"""Knowledge distillation: train a smaller student to imitate a teacher checkpoint, on ``accelerate``.

    ws.distill("teacher", "student_out", "corpus.txt", DistillConfig(layers=(0, 2, 4), steps=500))

The student is either a checkpoint (``student``, e.g. a structurally pruned model) or built from the teacher's own
layers (``layers`` / ``keep_every``). The loss follows the model kind (``kinds.KINDS``): KD + CE for causal and
masked LMs, hidden state MSE + cosine for encoders without a head (see ``losses``). The output is a plain
transformers directory with the tokenizer, written atomically; under ``accelerate launch`` the same call trains
data-parallel on several processes.

This package's top level is torch-free (the CLI reads ``DistillConfig``); ``distill`` loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weightsmith.compress.distill.config import DistillConfig, make_config

if TYPE_CHECKING:
    from weightsmith.compress.distill.verb import distill

__all__ = ["DistillConfig", "distill", "make_config"]


def __getattr__(name: str) -> Any:
    if name == "distill":
        from weightsmith.compress.distill.verb import distill

        return distill
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
