"""Distillation losses: pure functions on tensors, no models and no files.

Shapes: B batch, L sequence length, V vocabulary, D hidden width. ``mask`` is (B, L) with 1 where a position counts
(a real token, or a masked position for masked LM). Every loss is a mean over the counted positions (per token, not
per batch row), so batches with different padding weigh tokens equally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, L) ``values`` over the positions where ``mask`` is set."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged per counted token.

    Hinton et al. 2015, "Distilling the knowledge in a neural network": the T² factor keeps the gradient scale of the
    soft term independent of T. Logits (B, L, V) are promoted to float32 before the softmax.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, L)
    return temperature**2 * _masked_mean(kl, mask)


def token_ce(student_logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy of (B, L, V) logits against (B, L) labels, averaged per counted token."""
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return _masked_mean(ce.view(labels.shape), mask)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    mask: Tensor,
    *,
    temperature: float,
    alpha: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y), both averaged per counted token.

    Hinton et al. 2015; DistilBERT (Sanh et al. 2019) uses the same soft term at T = 2. For a causal LM the caller
    passes logits and labels already aligned to the next token; for a masked LM ``mask`` selects the masked
    positions. α = 0 is plain CE training (``teacher_logits`` may then be None); α = 1 is pure distillation.
    Returns the loss and its parts.
    """
    if alpha > 0 and teacher_logits is None:
        raise ValueError("kd_loss: alpha > 0 needs the teacher's logits")
    kl = (
        soft_kl(student_logits, teacher_logits, mask, temperature)
        if alpha > 0 and teacher_logits is not None
        else student_logits.new_zeros(())
    )
    ce = token_ce(student_logits, labels, mask) if alpha < 1 else student_logits.new_zeros(())
    return alpha * kl + (1 - alpha) * ce, {"kl": kl.detach(), "ce": ce.detach()}


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D) hidden states → (B, D) mean over the counted tokens (sentence-transformers' mean pooling)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def hidden_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """L = MSE(h_s, h_t) + (1 − cos(h_s, h_t)) per token + (1 − cos(pool(h_s), pool(h_t))) per sentence.

    For encoders without a head (sentence embedders such as MiniLM): the per-token terms keep every output position
    close to the teacher's, the pooled term targets what the embedder is used for. MSE is the mean over the hidden
    width, averaged per counted token; DistilBERT's cosine loss on hidden states is the per-token cosine term.
    Inputs (B, L, D), computed in float32.
    """
    s, t = student_hidden.float(), teacher_hidden.float()
    mse = _masked_mean((s - t).pow(2).mean(-1), mask)
    cos_tok = _masked_mean(1 - F.cosine_similarity(s, t, dim=-1), mask)
    cos_pool = (1 - F.cosine_similarity(mean_pool(s, mask), mean_pool(t, mask), dim=-1)).mean()
    return mse + cos_tok + cos_pool, {"mse": mse.detach(), "cos_tok": cos_tok.detach(), "cos_pool": cos_pool.detach()}


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor) -> Tensor:
    """MSE(h_s, h_t): the mean over the hidden width of (B, L, D) states, averaged per counted position (float32)."""
    return _masked_mean((student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1), mask)


def feature_loss(
    student_feats: list[Tensor], teacher_feats: list[Tensor], projections: list[torch.nn.Module], mask: Tensor
) -> Tensor:
    """L = (1/K) Σₖ MSE(Wₖ hₛ⁽ᵏ⁾, hₜ⁽ᵏ⁾) over K chosen layer pairs, averaged per counted token.

    FitNets (Romero et al. 2015) hint loss: Wₖ is a learned linear projection (D_s → D_t) when the widths differ,
    the identity otherwise. The projections are trained with the student and not written to the output.
    """
    total = mask.new_zeros((), dtype=torch.float32)
    for s, t, proj in zip(student_feats, teacher_feats, projections, strict=True):
        total = total + _masked_mean((proj(s.float()) - t.float()).pow(2).mean(-1), mask)
    return total / max(len(student_feats), 1)
