"""On-policy distillation (GKD: Agarwal et al. 2024, arXiv:2306.13649; TRL's ``GKDTrainer``).

A seeded coin with probability λ (``--lmbda``) decides, per global micro-batch, whether the
student trains on the data's completions (off-policy, as plain ``kd``) or on completions it
samples itself from the same prompts: the student continues each prompt (batched, left-padded)
at ``--gen-temperature`` for at most ``--max-new-tokens`` tokens, cut after its first EOS, and
the teacher then scores those sequences. Only the generated tokens are trained on.

The coin uses its own generator (the same draws on every process) and sampling runs inside
``torch.random.fork_rng``, so λ = 0 never draws, never generates and leaves every random
stream of the run untouched: results equal plain ``kd`` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.core.training.data import Example
from weightsmith.core.training.losses import IGNORE_INDEX
from weightsmith.errors import ConfigError


def check_lmbda(lmbda: float) -> None:
    """λ is a probability: the fraction of micro-batches the student generates."""
    if not 0.0 <= lmbda <= 1.0:
        raise ConfigError(f"--lmbda must be in [0, 1], got {lmbda}")


def prompt_length(example: Example, prompt_tokens: int) -> int:
    """How many leading tokens of ``example`` the student continues: its prompt (the positions
    before the first trained label) or, for a plain-text window, its first ``prompt_tokens``."""
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    if first > 0:
        return first
    return max(1, min(prompt_tokens, len(example.input_ids) - 1))


def completion_lengths(new_tokens: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Per row of generated tokens (B, N): tokens up to and including the first EOS (N if none)."""
    n = new_tokens.shape[1]
    if eos_id is None:
        return torch.full((new_tokens.shape[0],), n, dtype=torch.long)
    is_eos = new_tokens == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], n,
                        dtype=torch.long))  # fmt: skip
    return torch.clamp(first + 1, max=n)


@dataclass(frozen=True)
class RolloutSettings:
    """How the student writes its completions (recorded in the run's config)."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    prompt_tokens: int = 16  # plain-text windows: tokens used as the prompt
    seq_len: int = 512  # prompt + completion cut to this


@torch.no_grad()
def student_rollouts(
    model, examples: list[Example], cfg: RolloutSettings, *, pad_id: int, eos_id: int | None,
    seed: int,
) -> list[Example]:  # fmt: skip
    """The student's completions of the prompts of ``examples``, as new examples whose labels
    cover the generated tokens only. One batched ``generate`` (left-padded prompts)."""
    prompts = [e.input_ids[: prompt_length(e, cfg.prompt_tokens)] for e in examples]
    width = max(len(p) for p in prompts)
    dev = next(model.parameters()).device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    sample = cfg.temperature > 0
    was_training = model.training
    model.eval()  # no dropout while sampling (TRL disables it too)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=ids.to(dev), attention_mask=attn.to(dev),
                max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                temperature=cfg.temperature if sample else None, top_k=0 if sample else None,
                top_p=1.0 if sample else None, pad_token_id=pad_id, eos_token_id=eos_id,
            )  # fmt: skip
    finally:
        model.train(was_training)
    new = out[:, width:].cpu()
    lengths = completion_lengths(new, eos_id)
    rollouts = []
    for p, row, n in zip(prompts, new.tolist(), lengths.tolist(), strict=True):
        gen = row[:n]
        rollouts.append(Example(tuple([*p, *gen][: cfg.seq_len]),
                                tuple([IGNORE_INDEX] * len(p) + gen)[: cfg.seq_len]))  # fmt: skip
    return rollouts


class OnPolicyMix:
    """Decides, micro-batch by micro-batch, whether the student generates the completions.

    ``draw()`` is a Bernoulli(λ) from a generator seeded by the run's seed; every process
    calls it once per micro-batch, so they agree. Sampling is seeded by (seed, draw, rank).
    """

    def __init__(self, lmbda: float, cfg: RolloutSettings, seed: int, rank: int = 0) -> None:
        check_lmbda(lmbda)
        self.lmbda, self.cfg, self.seed, self.rank = lmbda, cfg, seed, rank
        self.gen = torch.Generator().manual_seed(seed)
        self.draws = 0
        self.generated = 0  # micro-batches the student generated

    def draw(self) -> bool:
        if self.lmbda == 0.0:
            return False
        self.draws += 1
        return bool(torch.rand((), generator=self.gen).item() < self.lmbda)

    def rollouts(self, model, examples: list[Example], pad_id: int, eos_id: int | None):
        self.generated += 1
        seed = (self.seed * 1_000_003 + self.draws) * 1024 + self.rank
        return student_rollouts(model, examples, self.cfg, pad_id=pad_id, eos_id=eos_id,
                                seed=seed)  # fmt: skip
