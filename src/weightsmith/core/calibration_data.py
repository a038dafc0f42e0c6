"""Calibration data: text from a file (or the built-in calibration mix), the model's tokenizer, and
fixed-length token windows for :class:`~weightsmith.core.calibration.LayerStreamer`."""

from __future__ import annotations

import gzip
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
    source: str  # a path, or BUILTIN_SOURCE

    @property
    def builtin(self) -> bool:
        return self.source == BUILTIN_SOURCE


BUILTIN_SOURCE = "builtin:calibration-mix-v1"
BUILTIN_FILE = Path(__file__).parent / "data" / "calibration-mix.txt.gz"
FLAGS = ("--calib-samples", "--seq-len")  # the calibrated commands' options for samples, seq_len


def builtin_text() -> str:
    """weightsmith's default calibration mix (``core/data/calibration-mix.txt.gz``, ~355 kB of
    text in ten domains: stories, explanations, chat, non-English prose, math with worked
    solutions, structured data, Python code, Markdown docs), documents interleaved so that any
    prefix is as diverse as the whole. Provenance and licence: ``core/data/README.md``."""
    with gzip.open(BUILTIN_FILE, "rt", encoding="utf-8") as f:
        return f.read()


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
    built-in calibration mix (:func:`builtin_text`; callers say so on stderr)."""
    if path is None:
        return CalibrationText(builtin_text(), BUILTIN_SOURCE)
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


def require_calibration_tokens(
    source: str, tokens: int, samples: int, seq_len: int, flags: tuple[str, str] = FLAGS
) -> None:
    """The one check of every calibrated command: ``samples`` windows of ``seq_len`` tokens need
    ``samples * seq_len`` tokens of text; fewer is a ConfigError naming the text, never a
    silent reduction. ``flags``: the command's options for the two numbers."""
    need = samples * seq_len
    if tokens < need:
        raise ConfigError(
            f"calibration text {source}: {tokens} tokens, fewer than the {need} that "
            f"{flags[0]} {samples} x {flags[1]} {seq_len} need; lower {flags[0]} or "
            f"{flags[1]}, or give a longer --calib"
        )


def tokenize_windows(
    tokenizer: Any,
    text: str,
    *,
    samples: int,
    seq_len: int,
    source: str = "(given)",
    flags: tuple[str, str] = FLAGS,
) -> torch.Tensor:
    """``samples`` consecutive non-overlapping windows of ``seq_len`` tokens from ``text``:
    ``(samples, seq_len)``; text too short for them is a ConfigError
    (:func:`require_calibration_tokens`)."""
    if samples < 1 or seq_len < 2:
        raise ConfigError(f"need samples >= 1 and seq_len >= 2 (got {samples}, {seq_len})")
    need = samples * seq_len
    # Tokenize only what is needed (a token is rarely more than 16 characters) unless short.
    ids = _token_ids(tokenizer, text[: need * 16])
    if len(ids) < need and len(text) > need * 16:
        ids = _token_ids(tokenizer, text)
    require_calibration_tokens(source, len(ids), samples, seq_len, flags)
    return torch.tensor(ids[:need], dtype=torch.long).view(samples, seq_len)


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def calibration_windows(
    root: str | Path,
    calib: str | Path | None,
    samples: int,
    seq_len: int,
    flags: tuple[str, str] = FLAGS,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The windows of :func:`tokenize_windows` on ``calib`` (None: the built-in mix) with the
    checkpoint's tokenizer at ``root``, and what they are (``source``, ``samples``,
    ``seq_len``, ``tokens``; recorded in reports)."""
    text = load_calibration_text(calib)
    ids = tokenize_windows(
        load_tokenizer(root), text.text, samples=samples, seq_len=seq_len, source=text.source,
        flags=flags,
    )  # fmt: skip
    info = {"source": text.source, "samples": samples, "seq_len": seq_len, "tokens": ids.numel()}
    return ids, info
