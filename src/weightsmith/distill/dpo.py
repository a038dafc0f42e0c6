"""DPO losses (Rafailov et al. 2023) as TRL defines them: pure functions on per-sequence log-probs.

With ``h = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))``:

- ``sigmoid`` (DPO, eq. 7; with label smoothing ε as in cDPO):
  ``−(1−ε)·log σ(β·h) − ε·log σ(−β·h)``
- ``hinge`` (SLiC): ``max(0, 1 − β·h)``
- ``ipo`` (Azar et al. 2023, eq. 17): ``(h − 1/(2β))²``, computed on log-probs *averaged* over
  the completion tokens (TRL does the same), not summed.

Implicit rewards are ``β·(log π(y) − log π_ref(y))``; reward accuracy is the fraction of pairs
whose chosen reward is strictly above the rejected one, the margin their difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weightsmith.core.training.losses import IGNORE_INDEX
from weightsmith.errors import ConfigError

PairLoss = Callable[[torch.Tensor, float, float], torch.Tensor]
DPO_LOSSES: dict[str, PairLoss] = {}
AVERAGED_LOSSES = {"ipo"}  # losses defined on per-token average log-probs


def dpo_loss_type(name: str) -> Callable[[PairLoss], PairLoss]:
    """Register ``fn(h, beta, label_smoothing) -> per-pair loss`` under ``name``."""

    def register(fn: PairLoss) -> PairLoss:
        DPO_LOSSES[name] = fn
        return fn

    return register


@dpo_loss_type("sigmoid")
def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )


@dpo_loss_type("hinge")
def hinge_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return torch.relu(1 - beta * h)


@dpo_loss_type("ipo")
def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return (h - 1 / (2 * beta)) ** 2


@dataclass(frozen=True)
class DpoSettings:
    """β, the loss variant and the held-out share of a DPO run."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    eval_fraction: float = 0.1  # held-out pairs when no --eval-data is given
    version: int = 1

    def __post_init__(self) -> None:
        if self.loss not in DPO_LOSSES:
            raise ConfigError(
                f"unknown DPO --loss {self.loss!r} (choose from {sorted(DPO_LOSSES)})"
            )
        if not self.beta > 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass(frozen=True)
class DpoOutput:
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    settings: DpoSettings,
) -> DpoOutput:
    """Per-pair loss and implicit rewards from (B,) sequence log-probs (already averaged for IPO)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = DPO_LOSSES[settings.loss](h, settings.beta, settings.label_smoothing)
    beta = settings.beta
    return DpoOutput(
        losses,
        (beta * (policy_chosen - ref_chosen)).detach(),
        (beta * (policy_rejected - ref_rejected)).detach(),
    )


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over completion tokens, their count) per row.

    ``logits`` (B, T, V) and ``labels`` (B, T) are aligned (already shifted): position t predicts
    ``labels[:, t]``; positions with label -100 are ignored.
    """
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Reward accuracy (strictly chosen > rejected) and mean margin/rewards over pairs."""
    margin = chosen_rewards - rejected_rewards
    return {
        "pairs": int(margin.numel()),
        "reward_accuracy": float((margin > 0).float().mean()) if margin.numel() else 0.0,
        "reward_margin": float(margin.mean()) if margin.numel() else 0.0,
        "chosen_reward": float(chosen_rewards.mean()) if margin.numel() else 0.0,
        "rejected_reward": float(rejected_rewards.mean()) if margin.numel() else 0.0,
    }
