"""Token-level pieces every training loss is built from: label alignment, the completion mask,
KL between log-distributions, and the CE (+ KL to a frozen reference) loss of QAT/BitNet.

All losses are *summed* over completion positions (labels != -100: neither prompt nor padding)
and divided by the number of such positions in the whole optimizer step (all micro-batches, all
processes), so gradient accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_for_next_token(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with token t+1 (causal LM): (B, T-1, V), (B, T-1)."""
    return logits[:, :-1, :], labels[:, 1:]


def completion_mask(labels: torch.Tensor) -> torch.Tensor:
    """True where a position is trained on (a completion token, not prompt or padding)."""
    return labels != IGNORE_INDEX


def completion_tokens(labels: torch.Tensor) -> int:
    """Completion positions of an *unshifted* label batch (what the step normalises by)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def kl_divergence(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position from log-probabilities, with 0·log 0 = 0."""
    p = p_logp.exp()
    diff = torch.where(p > 0, p_logp - q_logp, torch.zeros_like(p_logp))
    return (p * diff).sum(-1)


def completion_ce(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, float32 logits at completion positions (N, V), Σ CE over them) of shifted inputs."""
    mask = completion_mask(labels)
    s_logits = logits[mask].float()  # (N, V): only completion positions
    return mask, s_logits, F.cross_entropy(s_logits, labels[mask], reduction="sum")


def ce_kl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_tokens: int,
    kl_weight: float = 0.0,
    reference_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """[(1 − w)·Σ CE + w·Σ KL(p_ref ‖ p)] / ``num_tokens`` over completion positions (τ = 1).

    ``logits``/``reference_logits`` are already shifted (:func:`shift_for_next_token`); the
    reference is the frozen original model (QAT's and BitNet's ``--kl-weight``).
    """
    alpha = 1.0 - kl_weight
    mask, s_logits, ce_sum = completion_ce(logits, labels)
    div_sum = s_logits.new_zeros(())
    if alpha < 1.0:
        if reference_logits is None:
            raise ValueError("kl_weight > 0 needs reference_logits")
        s_logp = F.log_softmax(s_logits, dim=-1)
        r_logp = F.log_softmax(reference_logits[mask].float(), dim=-1)
        div_sum = kl_divergence(r_logp, s_logp).sum()
    total = alpha * ce_sum + (1.0 - alpha) * div_sum
    return total / max(num_tokens, 1)
