"""What QAT and BitNet training hands the engine: causal-LM windows and a CE (+ KL) loss step.

The model arrives with its Linears already swapped for training modules; the only
method-specific hook is ``on_step(step, total)`` (the BitNet λ schedule). Each optimizer step
draws ``batch_size × grad_accum`` windows (a seeded shuffle, one pass by default), and the loss
is summed over their tokens and divided by the step's token count (see
:mod:`weightsmith.core.training.engine`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from weightsmith.compress.qat.config import TrainConfig
from weightsmith.core.training import LoopConfig, StepOutput, TrainResult, train
from weightsmith.core.training.data import Example, collate
from weightsmith.core.training.losses import ce_kl_loss, completion_tokens, shift_for_next_token
from weightsmith.errors import ConfigError


class CausalLmTask:
    """Next-token CE on token windows, plus ``kl_weight``·KL(original ‖ model) when asked."""

    def __init__(self, model, examples: list[Example], pad_id: int, kl_weight: float,
                 device: torch.device, teacher=None) -> None:  # fmt: skip
        if kl_weight > 0 and teacher is None:
            raise ConfigError("--kl-weight > 0 needs the original model as teacher")
        self.model, self.examples, self.pad_id = model, examples, pad_id
        self.kl_weight, self.device, self.teacher = kl_weight, device, teacher

    def batch(self, indices: list[int]) -> dict:
        return collate([self.examples[i] for i in indices], self.pad_id)

    def count(self, batch: dict) -> int:
        return completion_tokens(batch["labels"])

    def step(self, batch: dict, indices: list[int], normaliser: int) -> StepOutput:
        ids = batch["input_ids"].to(self.device)
        attn = batch["attention_mask"].to(self.device)
        logits, labels = shift_for_next_token(
            self.model(input_ids=ids, attention_mask=attn).logits, batch["labels"].to(self.device)
        )
        reference = None
        if self.kl_weight > 0:
            with torch.no_grad():
                reference = self.teacher(input_ids=ids, attention_mask=attn).logits[:, :-1]
        loss = ce_kl_loss(logits, labels, normaliser, self.kl_weight, reference)
        return StepOutput(loss, int(attn.sum()))


def train_model(
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
) -> TrainResult:
    """Train ``model`` in place with the engine (AdamW + warm-up + cosine decay)."""
    task = CausalLmTask(model, examples, pad_id, cfg.kl_weight, device, teacher)
    result = train(model, task, len(examples), LoopConfig.of(cfg), on_step=on_step,
                   progress=progress, desc=desc)  # fmt: skip
    model.eval()
    return result
