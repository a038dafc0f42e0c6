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
from weightsmith.core.training.data import Example
from weightsmith.core.training.losses import ce_kl_loss
from weightsmith.core.training.tasks import TokenTask
from weightsmith.errors import ConfigError


class CausalLmTask(TokenTask):
    """Next-token CE on token windows, plus ``kl_weight``·KL(original ‖ model) when asked."""

    def __init__(self, model, examples: list[Example], pad_id: int, kl_weight: float,
                 device: torch.device, teacher=None) -> None:  # fmt: skip
        if kl_weight > 0 and teacher is None:
            raise ConfigError("--kl-weight > 0 needs the original model as teacher")
        super().__init__(model, examples, pad_id, device)
        self.kl_weight, self.teacher = kl_weight, teacher

    def step(self, batch: dict, indices: list[int], normaliser: int) -> StepOutput:
        ids, attn, logits, labels = self.forward(batch)
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
