"""Losses of the reference loop: masked next-token cross-entropy and logit distillation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_ce", "forward_kl"]


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
              denom: float | None = None) -> torch.Tensor:
    """Cross-entropy summed over positions where ``mask`` is 1, divided by ``denom`` (default: the
    number of those positions, i.e. the mean). A data-parallel rank passes the global count divided
    by the number of ranks, so averaged gradients equal the single-process ones.

    logits: (batch, seqlen, vocab); targets: (batch, seqlen) long; mask: (batch, seqlen) float
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    m = mask.flatten().to(ce.dtype)
    return (ce * m).sum() / (m.sum().clamp_min(1.0) if denom is None else denom)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
               temperature: float = 1.0, per_sample: bool = False, denom: float | None = None) -> torch.Tensor:
    """Forward KL ``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over masked positions.

    student_logits, teacher_logits: (batch, seqlen, vocab); mask: (batch, seqlen)
    per_sample: return ``(batch,)`` (mean over each sample's masked positions) instead of a scalar.
    denom: divide the masked sum by this instead of the masked count (see :func:`masked_ce`).
    """
    if temperature <= 0:
        raise ValueError(f"forward_kl: temperature must be > 0, got {temperature}")
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1) * temperature ** 2
    m = mask.to(kl.dtype)
    if per_sample:
        return (kl * m).sum(1) / m.sum(1).clamp_min(1.0)
    return (kl * m).sum() / (m.sum().clamp_min(1.0) if denom is None else denom)
