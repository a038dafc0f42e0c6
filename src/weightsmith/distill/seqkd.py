"""Sequence-level KD (Kim & Rush 2016): the teacher writes completions, the student trains on
them with cross-entropy. Works across tokenizers because only text passes between them."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from weightsmith.core.generation import GenerateConfig, generate_texts
from weightsmith.core.training.data import Records
from weightsmith.core.training.distributed import gather_objects
from weightsmith.distill.config import DistillConfig


def prompts_of(records: Records, teacher_tok, cfg: DistillConfig) -> list[str]:
    """Prompts: the given ones, or the first ``gen_prompt_tokens`` of each text window."""
    if records.pairs:
        return [p for p, _ in records.pairs]
    prompts = []
    for text in records.texts:
        ids = teacher_tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), cfg.seq_len):
            window = ids[start : start + cfg.seq_len]
            if len(window) > cfg.gen_prompt_tokens:
                prompts.append(teacher_tok.decode(window[: cfg.gen_prompt_tokens]))
    return prompts


def generate_pairs(
    teacher,
    teacher_tok,
    prompts: list[str],
    cfg: DistillConfig,
    *,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> list[tuple[str, str]]:
    """(prompt, teacher completion) pairs; each process generates its share, all get all."""
    mine = list(range(rank, len(prompts), world))
    gen = GenerateConfig(max_new_tokens=cfg.gen_max_new_tokens, temperature=cfg.gen_temperature,
                         batch_size=cfg.batch_size)  # fmt: skip
    out: list[tuple[int, str, str]] = []
    torch.manual_seed(cfg.seed + rank)  # one stream for all of this process's batches
    with tqdm(total=len(mine), desc="teacher generating", disable=not progress, leave=False) as bar:
        for b in range(0, len(mine), cfg.batch_size):
            idx = mine[b : b + cfg.batch_size]
            texts = generate_texts(teacher, teacher_tok, [prompts[i] for i in idx], gen, seed=None)
            out += [(i, prompts[i], t) for i, t in zip(idx, texts, strict=True)]
            bar.update(len(idx))
    merged = sorted((x for part in gather_objects(out, world) for x in part), key=lambda x: x[0])
    return [(p, c) for _, p, c in merged if c.strip()]
