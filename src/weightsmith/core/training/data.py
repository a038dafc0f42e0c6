"""Training text -> fixed-length token examples with labels masked to completion tokens.

Formats (chosen by extension):
- ``.txt``: the whole text is tokenized once and cut into windows of ``seq_len`` tokens; every
  token is a completion token.
- ``.jsonl``: one object per line, either ``{"text": ...}`` (each record tokenized and cut into
  windows) or ``{"prompt": ..., "completion": ...}`` (prompt tokens get label -100, so the loss
  covers the completion only; truncated to ``seq_len``).

Padding positions always get label -100 and attention mask 0.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from weightsmith.core.jsonl import json_objects
from weightsmith.core.training.losses import IGNORE_INDEX
from weightsmith.errors import ConfigError

DATA_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX where the token is prompt (never padding here)


@dataclass(frozen=True)
class Records:
    """Parsed data: either plain texts or (prompt, completion) pairs."""

    texts: list[str]
    pairs: list[tuple[str, str]]
    fingerprint: str


def read_records(path: str | os.PathLike[str]) -> Records:
    """Read a ``.txt`` or ``.jsonl`` file; one-line errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found")
    raw = path.read_bytes()
    fingerprint = "sha256:" + hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".txt":
        if not text.strip():
            raise ConfigError(f"{path}: empty data file")
        return Records([text], [], fingerprint)
    if path.suffix != ".jsonl":
        raise ConfigError(f"{path}: data must be .txt or .jsonl (got {path.suffix or 'no suffix'})")
    texts: list[str] = []
    pairs: list[tuple[str, str]] = []
    for lineno, obj in json_objects(path, text):
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            texts.append(obj["text"])
        elif (
            isinstance(obj, dict)
            and isinstance(obj.get("prompt"), str)
            and isinstance(obj.get("completion"), str)
        ):
            pairs.append((obj["prompt"], obj["completion"]))
        else:
            raise ConfigError(
                f"{path}:{lineno}: expected an object with 'text' or 'prompt' and 'completion'"
            )
    if texts and pairs:
        raise ConfigError(f"{path}: mixes 'text' and 'prompt'/'completion' records; use one kind")
    if not texts and not pairs:
        raise ConfigError(f"{path}: no records")
    return Records(texts, pairs, fingerprint)


def tokenize_records(records: Records, tokenizer, seq_len: int) -> list[Example]:
    """Turn records into examples of at most ``seq_len`` tokens (unpadded)."""
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2, got {seq_len}")
    examples: list[Example] = []
    for text in records.texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), seq_len):
            window = ids[start : start + seq_len]
            if len(window) >= 2:  # a window of one token predicts nothing
                examples.append(Example(tuple(window), tuple(window)))
    eos = tokenizer.eos_token_id
    for prompt, completion in records.pairs:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if eos is not None:
            c = [*c, eos]
        ids = (p + c)[:seq_len]
        labels = ([IGNORE_INDEX] * len(p) + c)[:seq_len]
        if any(x != IGNORE_INDEX for x in labels[1:]):
            examples.append(Example(tuple(ids), tuple(labels)))
    if not examples:
        raise ConfigError("the data holds no example with a completion token inside --seq-len")
    return examples


def data_fingerprint(records: Records, tokenizer_hash: str, seq_len: int) -> str:
    """Identity of the tokenized data: file bytes, tokenizer and windowing."""
    h = hashlib.sha256(
        f"{records.fingerprint}|{tokenizer_hash}|{seq_len}|{DATA_FORMAT_VERSION}".encode()
    )
    return "sha256:" + h.hexdigest()


def collate(examples: list[Example], pad_id: int, length: int | None = None) -> dict:
    """Right-pad to the longest example (or ``length``): ids, attention mask, labels."""
    width = length or max(len(e.input_ids) for e in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        attn[i, :k] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}
