"""The optimisation settings every training method shares, and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from weightsmith.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit")


def check_training_loop(cfg) -> None:
    """Reject impossible loop settings of a training config (distill, QAT, BitNet): ``steps``,
    ``epochs``, ``batch_size``, ``grad_accum``, ``seq_len`` and ``lr`` attributes."""
    if cfg.steps is not None and cfg.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {cfg.epochs}")
    if cfg.steps is not None and cfg.epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    for name in ("batch_size", "grad_accum", "seq_len"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if not cfg.lr > 0:
        raise ConfigError(f"--lr must be positive, got {cfg.lr}")


@dataclass(frozen=True)
class LoopConfig:
    """AdamW, linear warm-up + cosine decay, clipping; ``batch_size × grad_accum`` per step."""

    lr: float
    batch_size: int  # examples per micro-batch, over all processes
    grad_accum: int = 1
    steps: int | None = None  # None: --epochs (default one) passes over the examples
    epochs: float | None = None
    warmup_steps: int | None = None  # None: 5% of the steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    optim: str = "adamw"

    @classmethod
    def of(cls, cfg) -> LoopConfig:
        """The loop settings of a method's config (same-named attributes; ``optim`` optional)."""
        names = [f for f in cls.__dataclass_fields__ if f != "optim"]
        return cls(**{n: getattr(cfg, n) for n in names}, optim=getattr(cfg, "optim", "adamw"))

    def total_steps(self, n_examples: int) -> int:
        """``steps``, or enough steps for ``epochs`` (default one) passes over the examples."""
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil((self.epochs or 1.0) * n_examples / per_step))

    def warmup(self, total: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else round(0.05 * total)
