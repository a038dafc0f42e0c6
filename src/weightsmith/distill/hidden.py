"""Hidden-state distillation (DistillKit / Minitron style): pure losses between the student's and
the teacher's hidden states at chosen layer pairs, and the learned projection used when their
widths differ.

Layers are indices into transformers' ``output_hidden_states`` tuple: 0 is the embedding output,
``i`` the output of decoder layer ``i`` (1-based), ``L`` (the number of layers) the last one,
which transformers returns after the final norm. ``--hidden-layers "2:4,3:5"`` pairs student
layer 2 with teacher layer 4 and student 3 with teacher 5.

The loss of one micro-batch, added to the logit objective with weight W (``--hidden-weight``)::

    W · Σ_t (1/P) Σ_(s,k) ℓ(proj_(s,k)(h^S_s[t]), h^T_k[t]) / N

over the same positions t (those predicting a completion token) and the same global N as the
logit loss, P the number of pairs; ℓ is ``mse`` (mean over the hidden dimension of the squared
difference) or ``cosine`` (1 − cosine similarity). ``proj`` is a bias-free linear map from the
student's width to the teacher's, trained with the student (one per pair; the identity when the
widths agree) and never saved into the student's checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from weightsmith.errors import ConfigError

HiddenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
HIDDEN_LOSSES: dict[str, HiddenLoss] = {}


def hidden_loss(name: str) -> Callable[[HiddenLoss], HiddenLoss]:
    """Register ``fn(student (N, D), teacher (N, D)) -> per-position loss (N,)``."""

    def register(fn: HiddenLoss) -> HiddenLoss:
        HIDDEN_LOSSES[name] = fn
        return fn

    return register


@hidden_loss("mse")
def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the hidden dimension of (student − teacher)², per position."""
    return (student - teacher).pow(2).mean(-1)


@hidden_loss("cosine")
def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 − cos(student, teacher) per position (0 when parallel, 2 when opposite)."""
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


def parse_layer_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """``"s0:t0,s1:t1"`` -> ((s0, t0), (s1, t1)); a one-line error on anything else."""
    pairs = []
    for item in (x.strip() for x in text.split(",")):
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"--hidden-layers: expected student:teacher layer pairs such as "
                              f"'2:4,3:5', got {item!r}")  # fmt: skip
        pairs.append((int(parts[0]), int(parts[1])))
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"--hidden-layers: a pair is given twice in {text!r}")
    return tuple(pairs)


def check_layer_pairs(pairs: Sequence[tuple[int, int]], student_layers: int,
                      teacher_layers: int) -> None:  # fmt: skip
    """Refuse a pair outside 0..L of its model (L layers give L + 1 hidden states)."""
    for s, t in pairs:
        for who, idx, n in (("student", s, student_layers), ("teacher", t, teacher_layers)):
            if not 0 <= idx <= n:
                raise ConfigError(
                    f"--hidden-layers {s}:{t}: the {who} has {n} layers, so its hidden states "
                    f"are 0..{n} (0 = embeddings, {n} = last layer); {idx} is out of range"
                )


@dataclass(frozen=True)
class HiddenSettings:
    """Which hidden states are matched, how, and how much (recorded in the run's config)."""

    pairs: tuple[tuple[int, int], ...]
    weight: float = 1.0
    loss: str = "mse"
    version: int = 1

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ConfigError("--hidden-layers: no layer pairs")
        if self.loss not in HIDDEN_LOSSES:
            raise ConfigError(f"--hidden-loss {self.loss!r}: choose from {sorted(HIDDEN_LOSSES)}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"--hidden-weight must be positive, got {self.weight}")


class HiddenProjector(torch.nn.Module):
    """One bias-free ``Linear(student_width, teacher_width)`` per pair (identity when equal),
    initialised like ``nn.Linear`` from a seeded generator (the global RNG is left alone)."""

    def __init__(self, n_pairs: int, student_width: int, teacher_width: int, seed: int) -> None:
        super().__init__()
        self.maps = torch.nn.ModuleList()
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(student_width)
        for _ in range(n_pairs if student_width != teacher_width else 0):
            lin = torch.nn.utils.skip_init(torch.nn.Linear, student_width, teacher_width,
                                           bias=False)  # fmt: skip
            with torch.no_grad():
                lin.weight.copy_(torch.rand(lin.weight.shape, generator=gen) * 2 * bound - bound)
            self.maps.append(lin)

    def forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.maps[i](h) if len(self.maps) else h


def hidden_state_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    mask: torch.Tensor,
    settings: HiddenSettings,
    projector: HiddenProjector,
) -> torch.Tensor:
    """Σ over positions ``mask`` (B, T') of the mean over pairs of ℓ — not yet weighted or
    normalised. States are (B, T, D) with T ≥ T'; position t of ``mask`` is state position t."""
    fn = HIDDEN_LOSSES[settings.loss]
    width = mask.shape[1]
    total = mask.new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(settings.pairs):
        hs = student_states[s][:, :width][mask].float()
        ht = teacher_states[t][:, :width][mask].float()
        total = total + fn(projector(i, hs), ht).sum()
    return total / len(settings.pairs)
