"""The one training loop of every method (KD, seqKD, SFT, DPO, step-by-step, QAT, BitNet).

A method supplies a :class:`TrainingTask`: how to build a micro-batch from example indices, how
many units the step's loss is normalised by (completion tokens, preference pairs), and a loss
step. The engine owns the rest, in this order every optimizer step:

1. ``on_step(step, total)`` (e.g. BitNet's λ schedule), then lr = ``lr · lr_factor(step)``;
2. draw ``grad_accum`` global micro-batches from a seeded reshuffle (one generator, one
   ``randperm`` per epoch); each process keeps its ``rank::world`` share;
3. build them all, count their units and all-reduce that count into the global normaliser;
4. per micro-batch: ``loss = task.step(batch, indices, normaliser)`` (already divided by the
   normaliser), ``loss.backward()``; losses are summed in float32 as they come;
5. all-reduce the summed gradients, clip to ``max_grad_norm``, step AdamW, zero the grads.
   Under FSDP (``sharded=True``, :mod:`weightsmith.core.training.fsdp`) the backward pass has
   already reduce-scattered the summed gradients into each process's shard: no all-reduce.

Evaluation runs through ``evaluate()`` before the first step and after the last; saving is the
caller's (through :mod:`weightsmith.core.training.save`, atomic).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from weightsmith.core.report import peak_rss_bytes
from weightsmith.core.training.config import LoopConfig
from weightsmith.core.training.distributed import (
    ProcessGroup,
    all_reduce_grads,
    all_reduce_sum,
)
from weightsmith.core.training.schedule import lr_factor
from weightsmith.errors import ConfigError

SINGLE_PROCESS = ProcessGroup(rank=0, world=1, local_rank=0)


@dataclass
class StepOutput:
    """One micro-batch's loss (divided by the step's normaliser) and what it cost."""

    loss: torch.Tensor
    tokens: int  # input tokens this micro-batch put through the model (throughput)
    metrics: dict[str, float] = field(default_factory=dict)  # progress bar: mean over the step


class TrainingTask(Protocol):
    """What a training method supplies to :func:`train`."""

    def batch(self, indices: list[int]) -> Any:
        """The micro-batch of examples ``indices`` (e.g. collated tensors)."""

    def count(self, batch: Any) -> int:
        """Units this micro-batch adds to the step's normaliser (tokens, pairs…)."""

    def step(self, batch: Any, indices: list[int], normaliser: int) -> StepOutput:
        """Forward pass and loss of one micro-batch, divided by the global ``normaliser``."""


@dataclass
class TrainResult:
    """What the loop did: per-step losses, units and tokens over all processes, cost."""

    steps: int
    losses: list[float]
    units: int  # Σ of the normalisers: completion tokens (or pairs) trained on
    tokens: int  # input tokens through the model, all processes
    wall_s: float  # the loop alone (no evaluation)
    peak_rss: int  # after training, before evaluation and saving
    eval_before: dict | None = None
    eval_after: dict | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.wall_s, 1e-9)


def micro_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Global micro-batches of example indices: a seeded reshuffle every epoch."""
    gen = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending += torch.randperm(n, generator=gen).tolist()
        yield pending[:batch_size]
        pending = pending[batch_size:]


def make_optimizer(params: list[torch.nn.Parameter], loop: LoopConfig) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over ``params``; refuses an empty list."""
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if loop.optim == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--optim adamw8bit needs bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=loop.lr, weight_decay=loop.weight_decay)
    return torch.optim.AdamW(params, lr=loop.lr, weight_decay=loop.weight_decay)


def train(
    model: torch.nn.Module,
    task: TrainingTask,
    n_examples: int,
    loop: LoopConfig,
    *,
    pg: ProcessGroup = SINGLE_PROCESS,
    on_step: Callable[[int, int], None] | None = None,
    evaluate: Callable[[], dict | None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
    desc: str = "train",
    sharded: bool = False,
) -> TrainResult:
    """Train ``model``'s trainable parameters in place on ``task``; see the module docstring.

    ``optimizer`` replaces the default :func:`make_optimizer` (its lr is overwritten each step
    by the schedule).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = make_optimizer(params, loop)
    eval_before = evaluate() if evaluate is not None else None
    total = loop.total_steps(n_examples)
    warmup = loop.warmup(total)
    batches = micro_batches(n_examples, loop.batch_size, loop.seed)
    losses: list[float] = []
    units = tokens = 0
    bar = tqdm(total=total, desc=desc, unit="step", disable=not (progress and pg.main))
    start = time.perf_counter()
    model.train()
    with bar:
        for step in range(total):
            if on_step is not None:
                on_step(step, total)
            for group in optimizer.param_groups:
                group["lr"] = loop.lr * lr_factor(step, total, warmup, loop.min_lr_ratio)
            micro = [next(batches)[pg.rank :: pg.world] for _ in range(loop.grad_accum)]
            built = [task.batch(idx) for idx in micro]
            local = sum(task.count(b) for b in built)
            normaliser = int(all_reduce_sum(torch.tensor(float(local)), pg.world).item())
            step_loss = torch.zeros(())
            metrics: dict[str, float] = {}
            for idx, b in zip(micro, built, strict=True):
                out = task.step(b, idx, normaliser)
                out.loss.backward()
                step_loss += out.loss.detach().cpu()
                tokens += out.tokens
                for k, v in out.metrics.items():  # shown as the mean over the micro-batches
                    metrics[k] = metrics.get(k, 0.0) + v / len(micro)
            if not sharded:  # FSDP: reduce-scattered in backward already
                all_reduce_grads(params, pg.world)
            if loop.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, loop.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(all_reduce_sum(step_loss, pg.world)))
            units += normaliser
            rate = tokens * pg.world / max(time.perf_counter() - start, 1e-9)
            shown = {k: f"{v:.3f}" for k, v in metrics.items()}
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{rate:.0f}", **shown)
            bar.update(1)
    result = TrainResult(total, losses, units, 0, time.perf_counter() - start, peak_rss_bytes())
    result.tokens = int(all_reduce_sum(torch.tensor(float(tokens)), pg.world).item())
    result.eval_before = eval_before
    result.eval_after = evaluate() if evaluate is not None else None
    return result
