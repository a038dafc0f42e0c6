"""Calibration data: text from a file (or the built-in fallback), the model's tokenizer, and
fixed-length token windows for :class:`~weightsmith.core.calibration.LayerStreamer`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsmith.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class CalibrationText:
    """Calibration text and where it came from (recorded in reports)."""

    text: str
    source: str  # a path, or "builtin"

    @property
    def builtin(self) -> bool:
        return self.source == "builtin"


def read_text_file(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of ``path``; a ConfigError naming ``what`` and the path when it is
    missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {p}: unreadable ({e})") from None


def load_calibration_text(path: str | Path | None, max_chars: int | None = None) -> CalibrationText:
    """Read calibration text from a ``.txt`` file, or a ``.jsonl`` file (the ``text`` field of
    each line, else its first string field), joined by blank lines. With ``path=None`` return the
    built-in fallback: a few kilobytes of plain English prose shipped with weightsmith, enough to
    run but not representative of any model's domain (callers say so in their output)."""
    if path is None:
        from weightsmith.core.calibration_text import BUILTIN_TEXT

        return CalibrationText(BUILTIN_TEXT, "builtin")
    p = Path(path)
    raw = read_text_file(p, "calibration file")
    if p.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"calibration file {p}: line {n} is not JSON ({e})") from None
            value = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(value, str) and isinstance(obj, dict):
                value = next((v for v in obj.values() if isinstance(v, str)), None)
            if not isinstance(value, str):
                raise ConfigError(f"calibration file {p}: line {n} has no text field")
            parts.append(value)
        raw = "\n\n".join(parts)
    elif p.suffix not in (".txt", ".text", ".md"):
        raise ConfigError(f"calibration file {p}: expected a .txt or .jsonl file")
    if not raw.strip():
        raise ConfigError(f"calibration file {p}: is empty")
    return CalibrationText(raw[:max_chars] if max_chars else raw, str(p))


def load_tokenizer(root: str | Path):
    """The checkpoint's own tokenizer (transformers ``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root))
    except Exception as e:  # transformers raises many types for missing/broken tokenizers
        raise CheckpointError(f"{root}: cannot load the tokenizer ({type(e).__name__})") from None


def tokenize_windows(tokenizer: Any, text: str, *, samples: int, seq_len: int) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seq_len`` tokens from ``text``: ``(n, seq_len)``
    with ``n <= samples``. Text shorter than one window gives one shorter window."""
    if samples < 1 or seq_len < 2:
        raise ConfigError(f"need samples >= 1 and seq_len >= 2 (got {samples}, {seq_len})")
    # Tokenize only what is needed (a token is rarely more than 16 characters).
    ids = tokenizer(text[: samples * seq_len * 16], add_special_tokens=False, verbose=False)[
        "input_ids"
    ]
    ids = torch.tensor(ids, dtype=torch.long)
    if ids.numel() < 2:
        raise ConfigError("calibration text is shorter than 2 tokens")
    n = min(samples, ids.numel() // seq_len)
    if n == 0:
        return ids.unsqueeze(0)
    return ids[: n * seq_len].view(n, seq_len)
