"""Can the student learn from the teacher's logits? Compare tokenizers and logit widths.

- identical tokenizers and widths: compare logits directly;
- identical tokenizers, different widths (embedding rows padded to a multiple of 64/128, the
  Qwen case): compare over the common length, which covers every real token, with a note;
- different tokenizers: token i means different things to the two models, so per-token logit
  KD is meaningless; we refuse and point to ``--loss uld`` (cross-tokenizer ULD,
  :mod:`weightsmith.distill.uld`) and sequence-level KD (``--method seqkd``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from weightsmith.errors import ConfigError


def tokenizer_hash(tokenizer) -> str:
    """A stable identity of a tokenizer's token -> id map and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {
        k: getattr(tokenizer, k, None)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    }
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class VocabPlan:
    """How many logits to compare and what to tell the user about it."""

    common: int  # compare logits [..., :common]
    note: str | None = None


def plan_vocab(
    teacher_tok,
    student_tok,
    teacher_width: int,
    student_width: int,
    where: tuple[str, str] = ("teacher", "student"),
) -> VocabPlan:
    """Decide how to compare logits, or raise a one-line ConfigError suggesting seqkd."""
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        only_t = len(set(t_vocab.items()) - set(s_vocab.items()))
        raise ConfigError(
            f"{where[0]} and {where[1]} use different tokenizers ({len(t_vocab)} vs "
            f"{len(s_vocab)} tokens, {only_t} token ids differ): this logit loss needs a "
            "shared vocabulary; give --loss uld (cross-tokenizer logit KD), or use --method "
            "seqkd (the teacher writes completions, the student trains on them)"
        )
    real = max(t_vocab.values()) + 1
    common = min(teacher_width, student_width)
    if common < real:
        raise ConfigError(
            f"{where[0] if teacher_width < real else where[1]} has only {common} output rows "
            f"but its tokenizer has {real} token ids"
        )
    if teacher_width == student_width:
        return VocabPlan(common)
    return VocabPlan(
        common,
        note=(
            f"same tokenizer, padded embedding rows ({teacher_width} teacher vs "
            f"{student_width} student logits): comparing the first {common}, which cover all "
            f"{real} tokens"
        ),
    )
