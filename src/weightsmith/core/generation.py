"""Batched generation with a causal LM: left-padded prompts, greedy or seeded sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.errors import ConfigError


@dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")


@torch.no_grad()
def generate_texts(
    model, tok, prompts: list[str], cfg: GenerateConfig, seed: int | None
) -> list[str]:
    """Continue each prompt (left-padded batch); greedy at temperature 0, else sampled.

    ``seed`` reseeds torch before sampling; ``None`` continues the current random stream.
    """
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
        sample = cfg.temperature > 0
        if seed is not None:
            torch.manual_seed(seed)
        gen = model.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None,
            top_k=0 if sample else None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,  # stop at the tokenizer's EOS even when the model's
        )  # generation_config names none
    finally:
        tok.padding_side = side
    new = gen[:, enc["input_ids"].shape[1] :]
    return [tok.decode(row, skip_special_tokens=True) for row in new]
