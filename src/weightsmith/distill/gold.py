"""GOLD across tokenizers (TRL's ``GOLDTrainer`` with ``uld_use_hybrid_loss``): which tokens two
vocabularies share, by the text each token stands for.

TRL matches tokens whose raw vocabulary strings are equal, so a byte-level BPE teacher
(``Ġthe``) and a sentencepiece student (``▁the``) share almost nothing but bare letters. We
match the *text*: each token's string is decoded the way its tokenizer's decoder does it
(:func:`token_surfaces`):

- byte-level BPE (a ``ByteLevel`` decoder): GPT-2's byte-to-unicode table inverted, then UTF-8
  (``Ġthe`` -> " the"); a token that is not complete UTF-8 on its own (part of a character) has
  no text and stays unmatched;
- sentencepiece-style decoders: their ``Replace``/``Metaspace`` steps (``▁`` -> space) and
  ``<0xNN>`` byte-fallback tokens for ASCII bytes (a fallback byte only when no ordinary token
  has the same text);
- special tokens (BOS, EOS, pad, ...) are never matched.

Two maps (:func:`build_vocab_map`), teacher id -> student id:

- ``exact`` (GOLD's): a teacher token maps to the student token with the same text (one to one);
- ``prefix``: every teacher token with text maps to the student token with the *longest text
  that is a prefix of it* (" there" -> " the" when the student has no " there"): the student's
  first step towards writing what the teacher predicted. Many to one; it covers the teacher's
  whole distribution where ``exact`` drops the mass on words the student spells in pieces.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from weightsmith.errors import ConfigError

VOCAB_MAPS = ("exact", "prefix")
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class GoldSettings:
    """``--loss gold`` across tokenizers: the weights of its two terms and the vocabulary map."""

    matched_weight: float = 1.0  # w_m: JSD_β over the shared tokens
    unmatched_weight: float = 1.0  # w_u: sorted L1 over the rest
    vocab_map: str = "exact"  # a key of VOCAB_MAPS
    version: int = 1

    def __post_init__(self) -> None:
        if self.vocab_map not in VOCAB_MAPS:
            raise ConfigError(f"unknown --gold-map {self.vocab_map!r} (choose from {VOCAB_MAPS})")
        for name, w in (("matched", self.matched_weight), ("unmatched", self.unmatched_weight)):
            if not w >= 0:
                raise ConfigError(f"--gold-{name}-weight must be >= 0, got {w}")
        if self.matched_weight == 0 and self.unmatched_weight == 0:
            raise ConfigError("--gold-matched-weight and --gold-unmatched-weight are both 0")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable unicode character -> its byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_steps(tok) -> list[dict]:
    """The steps of the tokenizer's decoder (a ``Sequence`` flattened), from its JSON."""
    dec = json.loads(tok.backend_tokenizer.to_str()).get("decoder") or {}
    return list(dec.get("decoders", [])) if dec.get("type") == "Sequence" else [dec]


def token_surfaces(tok) -> dict[int, str]:
    """Token id -> the text it stands for; special tokens and tokens with no text on their own
    (a partial UTF-8 character, an empty string) are absent. Needs a fast tokenizer."""
    steps = _decoder_steps(tok)
    kinds = {d.get("type") for d in steps}
    replaces = [(d["pattern"]["String"], d["content"]) for d in steps
                if d.get("type") == "Replace" and "String" in d.get("pattern", {})]  # fmt: skip
    replaces += [(d.get("replacement", "▁"), " ") for d in steps if d.get("type") == "Metaspace"]
    byte_level = "ByteLevel" in kinds
    table = _byte_decoder() if byte_level else {}
    special = set(tok.all_special_ids)
    special |= {i for i, t in tok.added_tokens_decoder.items() if t.special}
    out: dict[int, str] = {}
    fallback: dict[int, str] = {}
    for piece, i in tok.get_vocab().items():
        if i in special:
            continue
        m = _BYTE_TOKEN.match(piece) if "ByteFallback" in kinds else None
        if m:
            if int(m.group(1), 16) < 0x80:
                fallback[i] = chr(int(m.group(1), 16))
            continue
        if byte_level:
            if any(c not in table for c in piece):
                continue
            try:
                text = bytes(table[c] for c in piece).decode("utf-8")
            except UnicodeDecodeError:
                continue
        else:
            text = piece
            for old, new in replaces:
                text = text.replace(old, new)
        if text:
            out[i] = text
    have = set(out.values())
    out.update({i: t for i, t in fallback.items() if t not in have})
    return out


@dataclass(frozen=True)
class VocabMap:
    """Teacher id -> student id (−1: no match), with counts for the run's notes."""

    teacher_to_student: torch.Tensor  # (V_T,) long
    mode: str
    matched_teacher: int  # teacher tokens with a student id
    shared_student: int  # student tokens that receive at least one


def build_vocab_map(s_tok, t_tok, t_width: int, mode: str = "exact") -> VocabMap:
    """Map the teacher's ``t_width`` logits onto the student's tokens by text (module doc).
    Raises a one-line ConfigError when the two share no token."""
    if mode not in VOCAB_MAPS:
        raise ConfigError(f"unknown --gold-map {mode!r} (choose from {VOCAB_MAPS})")
    s_text = {}
    for i, text in sorted(token_surfaces(s_tok).items()):
        s_text.setdefault(text, i)  # the lowest id of a text (unique in real vocabularies)
    longest = max((len(t) for t in s_text), default=0)
    t2s = torch.full((t_width,), -1, dtype=torch.long)
    for i, text in token_surfaces(t_tok).items():
        if i >= t_width:
            continue
        if text in s_text:
            t2s[i] = s_text[text]
        elif mode == "prefix":
            for n in range(min(len(text) - 1, longest), 0, -1):
                if text[:n] in s_text:
                    t2s[i] = s_text[text[:n]]
                    break
    mapped = t2s[t2s >= 0]
    if mapped.numel() == 0:
        raise ConfigError(
            f"--loss gold: teacher and student tokenizers share no token by text ({len(t_tok)} "
            f"vs {len(s_tok)} tokens); use --loss uld, which needs no shared tokens"
        )
    return VocabMap(t2s, mode, int(mapped.numel()), int(mapped.unique().numel()))
