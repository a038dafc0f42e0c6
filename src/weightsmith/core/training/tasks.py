"""The common shape of a training task on token examples (causal-LM windows or prompt/completion
pairs): micro-batches are collated examples, normalised by their completion tokens, and the
forward pass returns next-token-aligned logits and labels. A method subclasses it and writes
only ``step`` (its loss)."""

from __future__ import annotations

import torch

from weightsmith.core.training.data import Example, collate
from weightsmith.core.training.engine import StepOutput
from weightsmith.core.training.losses import completion_tokens, shift_for_next_token


class TokenTask:
    """:class:`~weightsmith.core.training.engine.TrainingTask` over token examples."""

    def __init__(self, model, examples: list[Example], pad_id: int, device: torch.device) -> None:
        self.model, self.examples, self.pad_id, self.device = model, examples, pad_id, device

    def batch(self, indices: list[int]) -> dict:
        return collate([self.examples[i] for i in indices], self.pad_id)

    def count(self, batch: dict) -> int:
        return completion_tokens(batch["labels"])

    def forward(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """``(input_ids, attention_mask, logits, labels)`` on the device, logits/labels shifted
        so that position t predicts token t+1."""
        ids = batch["input_ids"].to(self.device)
        attn = batch["attention_mask"].to(self.device)
        logits, labels = shift_for_next_token(
            self.model(input_ids=ids, attention_mask=attn).logits, batch["labels"].to(self.device)
        )
        return ids, attn, logits, labels

    def step(self, batch: dict, indices: list[int], normaliser: int) -> StepOutput:
        raise NotImplementedError
