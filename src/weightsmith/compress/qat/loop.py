"""The one training loop of ``compress qat`` and ``compress bitnet``.

The model arrives with its Linears already swapped for training modules; the only
method-specific hook is ``on_step(step, total)`` (the BitNet λ schedule). Each optimizer step
draws ``batch_size × grad_accum`` windows (a seeded shuffle, one pass by default), and the loss
is summed over their tokens and divided by the step's token count, as in ``distill``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from weightsmith.compress.qat.config import TrainConfig
from weightsmith.distill.data import Example, collate
from weightsmith.distill.losses import IGNORE_INDEX, LossConfig, distillation_loss
from weightsmith.distill.losses import shift_for_next_token as shift
from weightsmith.distill.schedule import lr_factor
from weightsmith.distill.trainer import _micro_batches
from weightsmith.errors import ConfigError


@dataclass
class TrainStats:
    """What the loop did: steps, tokens, per-step losses, throughput."""

    steps: int
    tokens: int  # input tokens through the model
    wall_s: float
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.wall_s, 1e-9)


def total_steps(cfg: TrainConfig, n_examples: int) -> int:
    """``--steps``, or enough steps for ``--epochs`` (default one) passes over the examples."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.epochs or 1.0) * n_examples / (cfg.batch_size * cfg.grad_accum)))


def train(
    model: torch.nn.Module,
    examples: list[Example],
    pad_id: int,
    cfg: TrainConfig,
    device: torch.device,
    *,
    teacher: torch.nn.Module | None = None,
    on_step: Callable[[int, int], None] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainStats:
    """Train ``model`` in place with AdamW + warm-up + cosine decay; returns :class:`TrainStats`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if cfg.kl_weight > 0 and teacher is None:
        raise ConfigError("--kl-weight > 0 needs the original model as teacher")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_cfg = LossConfig(loss="fkl", temperature=1.0, alpha=1.0 - cfg.kl_weight)
    total = total_steps(cfg, len(examples))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * total)
    batches = _micro_batches(len(examples), cfg.batch_size, cfg.seed)
    stats = TrainStats(steps=total, tokens=0, wall_s=0.0)
    start = time.perf_counter()
    model.train()
    with tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar:
        for step in range(total):
            if on_step is not None:
                on_step(step, total)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total, warmup, cfg.min_lr_ratio)
            micro = [collate([examples[i] for i in next(batches)], pad_id)
                     for _ in range(cfg.grad_accum)]  # fmt: skip
            n_tok = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
            step_loss = 0.0
            for batch in micro:
                ids = batch["input_ids"].to(device)
                attn = batch["attention_mask"].to(device)
                logits, labels = shift(
                    model(input_ids=ids, attention_mask=attn).logits, batch["labels"].to(device)
                )
                kw = {}
                if cfg.kl_weight > 0:
                    with torch.no_grad():
                        kw["teacher_logits"] = teacher(input_ids=ids, attention_mask=attn).logits[
                            :, :-1
                        ]
                parts = distillation_loss(logits, labels, loss_cfg, n_tok, **kw)
                parts.loss.backward()
                step_loss += float(parts.loss.detach())
                stats.tokens += int(attn.sum())
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats.losses.append(round(step_loss, 6))
            stats.wall_s = time.perf_counter() - start
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{stats.tokens_per_s:.0f}")
            bar.update(1)
    model.eval()
    return stats
