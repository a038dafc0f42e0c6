"""Distillation losses: pure functions on tensors (no models, no files).

Conventions (all divergences are per position, summed over the vocabulary):

- ``p_T`` is the teacher's next-token distribution, ``p_S`` the student's, both at temperature
  τ: ``softmax(logits / τ)``. Temperature is a *loss* temperature only; it never affects
  generation (``--method seqkd`` samples at its own ``--gen-temperature``).
- ``fkl``: forward KL(p_T ‖ p_S) (Hinton et al.; mean-seeking).
- ``rkl``: reverse KL(p_S ‖ p_T) (mode-seeking; MiniLLM).
- ``jsd``: generalized JSD with mixture ``M = β·p_T + (1−β)·p_S`` (the GKD paper's mixture,
  arXiv:2306.13649 eq. 1, and TRL after huggingface/trl#3043, which fixed TRL's earlier
  swapped ``β·p_S + (1−β)·p_T``). We weight the two terms as
  ``(1−β)·KL(p_T ‖ M) + β·KL(p_S ‖ M)`` so that the loss is *continuous* in β and reduces to
  forward KL as β→0 and to reverse KL as β→1, which is what TRL documents for β. At β = 0.5 it
  is the standard JSD and equals the paper's JSD(0.5). (The paper's own weights,
  ``β·KL(p_T‖M) + (1−β)·KL(p_S‖M)``, vanish at both endpoints: near them β only scales the
  loss; see modelscope/ms-swift#10078.)
- ``gkd``: TRL's ``GKDTrainer.generalized_jsd_loss`` term for term (same mixture M, weights
  ``β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M)``, forward KL at β = 0 and reverse KL at β = 1 as special
  cases), for runs that must match TRL's GKD; equal to ``jsd`` at β = 0.5.
- ``uld``: the Universal Logit Distillation distance (Boizard et al. 2024, arXiv:2402.12030):
  both distributions sorted in decreasing order, the narrower one padded with zeros, then
  ``Σ_i |sort↓(p_S)_i − sort↓(p_T)_i|`` (the closed form of their Wasserstein-1 distance under
  the paper's uniform-cost assumption). Token identity is ignored, so the two vocabularies may
  differ: :mod:`weightsmith.distill.uld` aligns the positions of two tokenizers.
- ``gold``: the hybrid of TRL's GOLD trainer (``uld_use_hybrid_loss``) across tokenizers
  (:func:`gold_distance`): tokens the two vocabularies share (by the text they stand for,
  :mod:`weightsmith.distill.gold`) are compared *by identity* with ``jsd`` at β on both
  distributions renormalised over the shared tokens; the rest of each vocabulary by ``uld``'s
  sorted L1. With a single tokenizer every token is shared and it is ``jsd``.

The distillation objective (Hinton et al. 2015, with the τ² factor that keeps gradient
magnitudes comparable across temperatures)::

    loss = [ α · Σ_t CE_t  +  (1 − α) · τ² · Σ_t D_t ] / N

summed over completion positions t only (labels != -100: neither prompt nor padding) and
divided by N, the number of such positions in the *whole optimizer step* (all micro-batches
of gradient accumulation, all processes), so that accumulation and data parallelism give the
same gradient as one big batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weightsmith.core.training.losses import (  # re-exported: the token-level pieces
    IGNORE_INDEX,
    completion_ce,
    completion_mask,
    kl_divergence,
    shift_for_next_token,
)

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "LossConfig",
    "LossParts",
    "completion_mask",
    "distillation_loss",
    "divergence",
    "forward_kl",
    "generalized_jsd",
    "gold_distance",
    "reverse_kl",
    "shift_for_next_token",
    "sorted_l1",
    "sparse_divergence",
    "trl_generalized_jsd",
    "uld_distance",
]

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
DIVERGENCES: dict[str, Divergence] = {}


def divergence(name: str) -> Callable[[Divergence], Divergence]:
    """Register ``fn(student_logp, teacher_logp, beta) -> per-position divergence``."""

    def register(fn: Divergence) -> Divergence:
        DIVERGENCES[name] = fn
        return fn

    return register


@divergence("fkl")
def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.0):
    """KL(p_T ‖ p_S) per position."""
    return kl_divergence(teacher_logp, student_logp)


@divergence("rkl")
def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.0):
    """KL(p_S ‖ p_T) per position."""
    return kl_divergence(student_logp, teacher_logp)


@divergence("jsd")
def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5):
    """(1−β)·KL(p_T ‖ M) + β·KL(p_S ‖ M), M = β·p_T + (1−β)·p_S (see the module docstring)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    # log M computed in log space: mixing probabilities, not log-probabilities (trl#2202).
    mixture = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return (1.0 - beta) * kl_divergence(teacher_logp, mixture) + beta * kl_divergence(
        student_logp, mixture
    )


@divergence("gkd")
def trl_generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` exactly: β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M),
    M = β·p_T + (1−β)·p_S (GKD paper eq. 1); β = 0 is forward KL, β = 1 reverse KL (TRL's own
    special cases: the formula itself vanishes at both ends)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logp, teacher_logp)
    if beta == 1.0:
        return reverse_kl(student_logp, teacher_logp)
    mixture = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * kl_divergence(teacher_logp, mixture) + (1.0 - beta) * kl_divergence(
        student_logp, mixture
    )


def uld_distance(student_p: torch.Tensor, teacher_p: torch.Tensor) -> torch.Tensor:
    """Σ_i |sort↓(p_S)_i − sort↓(p_T)_i| per row, the narrower side padded with zeros.

    Works on (possibly unnormalised) probabilities of any two widths. Equal to sorting both
    fully, but only the top ``min(V_S, V_T)`` entries are sorted: beyond them one side is zero
    padding, so the rest contributes the other side's remaining mass.
    """
    k = min(student_p.shape[-1], teacher_p.shape[-1])
    s_top = student_p.topk(k, dim=-1).values
    t_top = teacher_p.topk(k, dim=-1).values
    dist = (s_top - t_top).abs().sum(-1)
    for p, top in ((student_p, s_top), (teacher_p, t_top)):
        if p.shape[-1] > k:  # the wider side's tail, against zero padding
            dist = dist + (p.sum(-1) - top.sum(-1)).clamp(min=0.0)
    return dist


@divergence("uld")
def sorted_l1(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.0):
    """ULD: :func:`uld_distance` of the two distributions per position (any widths)."""
    return uld_distance(student_logp.exp(), teacher_logp.exp())


@divergence("gold")
def gold_shared_vocabulary(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5
):
    """GOLD with one vocabulary: every token is matched, nothing is left to sort: ``jsd``."""
    return generalized_jsd(student_logp, teacher_logp, beta)


def gold_distance(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_to_student: torch.Tensor,
    beta: float = 0.5,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
) -> torch.Tensor:
    """GOLD's hybrid distance per row between two vocabularies (log-probabilities, possibly
    unnormalised: merged groups)::

        w_m · JSD_β( p_S[M] / Σ p_S[M] ,  Π p_T / Σ Π p_T )  +  w_u · ULD( p_S[¬M], p_T[¬mapped] )

    ``teacher_to_student`` (V_T,): the student id of each teacher token, −1 where none. Π p_T
    (V_S,) adds each mapped teacher token's probability onto its student token (one-to-one
    for GOLD's exact string match; several teacher tokens may share one student token), M is
    the set of student tokens that receive one. JSD is :func:`generalized_jsd` (β = 0: forward
    KL) on both renormalised over M; ULD is :func:`uld_distance` of the unmatched remainders
    (their own, unrenormalised masses). TRL feeds the matched probabilities to its JSD without
    renormalising them and defaults ``w_m`` to (matched tokens / V_T); we renormalise (a true
    divergence on the shared tokens) and take the weights as given.
    """
    v_s = student_logp.shape[-1]
    mapped = teacher_to_student >= 0
    targets = teacher_to_student[mapped]
    shared = torch.zeros(v_s, dtype=torch.bool, device=student_logp.device)
    shared[targets] = True
    if not bool(shared.any()):
        raise ValueError("teacher and student share no token: GOLD has nothing to match")
    ids = shared.nonzero().squeeze(-1)
    s_m = student_logp[..., ids]
    s_m = s_m - torch.logsumexp(s_m, -1, keepdim=True)
    t_p = teacher_logp.exp()
    proj = t_p.new_zeros(*t_p.shape[:-1], v_s).index_add_(-1, targets, t_p[..., mapped])
    t_m = proj[..., ids]
    t_m = (t_m / t_m.sum(-1, keepdim=True)).clamp_min(1e-30).log()
    dist = matched_weight * generalized_jsd(s_m, t_m, beta)
    if unmatched_weight:
        zero = t_p.new_zeros(*t_p.shape[:-1], 1)  # keeps both sides non-empty: adds 0
        s_rest = torch.cat([student_logp[..., ~shared].exp(), zero], -1)
        t_rest = torch.cat([t_p[..., ~mapped], zero], -1)
        dist = dist + unmatched_weight * uld_distance(s_rest, t_rest)
    return dist


def bucket_logprobs(
    student_logp: torch.Tensor, topk_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse a full distribution onto the k+1 buckets of a top-k cache.

    Returns ``(log p[ids] (…, k), log of the remaining mass (…))``; the tail is a logsumexp
    over the non-top-k entries (stable even when the top-k hold almost all the mass).
    """
    top = student_logp.gather(-1, topk_ids)
    rest = student_logp.scatter(-1, topk_ids, float("-inf"))
    return top, torch.logsumexp(rest, dim=-1)


def sparse_divergence(
    loss: str,
    student_logp: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logp: torch.Tensor,
    tail_logmass: torch.Tensor,
    beta: float = 0.5,
) -> torch.Tensor:
    """A divergence between the teacher's cached top-k + tail and the student, per position.

    Both distributions are compared on the same k+1 events (each top-k token, and "any other
    token"), so the result is a true divergence of coarsened distributions: it is zero iff they
    agree on those events and never exceeds the full-vocabulary divergence (data processing).
    """
    s_top, s_tail = bucket_logprobs(student_logp, topk_ids)
    student_b = torch.cat([s_top, s_tail.unsqueeze(-1)], dim=-1)
    teacher_b = torch.cat([topk_logp.to(s_top.dtype), tail_logmass.to(s_top.dtype)[..., None]], -1)
    return DIVERGENCES[loss](student_b, teacher_b, beta)


@dataclass(frozen=True)
class LossConfig:
    """How the distillation loss is formed (recorded in the output's provenance)."""

    loss: str = "fkl"  # a key of DIVERGENCES
    beta: float = 0.5  # jsd/gkd only: 0 = forward KL, 1 = reverse KL
    temperature: float = 2.0  # τ of the divergence term (CE always at τ = 1)
    alpha: float = 0.5  # weight of the hard-label CE term; 0 = pure KD, 1 = CE only
    version: int = 1

    def __post_init__(self) -> None:
        if self.loss not in DIVERGENCES:
            raise ValueError(f"unknown loss {self.loss!r} (choose from {sorted(DIVERGENCES)})")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class LossParts:
    """The step's loss (already divided by the global token count) and its summed parts."""

    loss: torch.Tensor  # scalar to backpropagate
    ce_sum: torch.Tensor  # Σ CE over this micro-batch's completion positions (detached)
    div_sum: torch.Tensor  # Σ divergence at τ (without τ²) (detached)
    tokens: int  # completion positions in this micro-batch


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: LossConfig,
    num_tokens: int,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> LossParts:
    """α·CE + (1−α)·τ²·D summed over completion positions, divided by ``num_tokens``.

    ``student_logits``/``teacher_logits`` are already shifted: (B, T, V) predicting
    ``labels`` (B, T) (use :func:`shift_for_next_token`). Vocabulary widths must already agree
    (the caller slices to the common length). ``teacher_topk`` is ``(ids, logp, tail)`` at
    temperature τ from a cache, used instead of ``teacher_logits``. ``num_tokens`` is the
    global count of completion positions in the optimizer step.
    """
    mask, s_logits, ce_sum = completion_ce(student_logits, labels)
    tokens = int(mask.sum())
    zero = s_logits.new_zeros(())
    div_sum = zero
    if cfg.alpha < 1.0:
        s_logp = F.log_softmax(s_logits / cfg.temperature, dim=-1)
        if teacher_topk is not None:
            ids, logp, tail = (t[mask] for t in teacher_topk)
            div = sparse_divergence(cfg.loss, s_logp, ids.long(), logp, tail, cfg.beta)
        elif teacher_logits is not None:
            if teacher_logits.shape[-1] != s_logits.shape[-1]:
                raise ValueError(
                    f"teacher has {teacher_logits.shape[-1]} logits, student "
                    f"{s_logits.shape[-1]}: slice both to the common vocabulary first"
                )
            t_logp = F.log_softmax(teacher_logits[mask].float() / cfg.temperature, dim=-1)
            div = DIVERGENCES[cfg.loss](s_logp, t_logp, cfg.beta)
        else:
            raise ValueError("alpha < 1 needs teacher_logits or teacher_topk")
        div_sum = div.sum()
    total = cfg.alpha * ce_sum + (1.0 - cfg.alpha) * cfg.temperature**2 * div_sum
    loss = total / max(num_tokens, 1)
    return LossParts(loss, ce_sum.detach(), div_sum.detach(), tokens)
