"""Reading JSON-lines input files with one-line errors naming the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from weightsmith.errors import ConfigError


def json_objects(path: str | os.PathLike[str], text: str) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` of each non-blank line of ``text`` (read from ``path``)."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def read_jsonl(path: str | os.PathLike[str], required: Iterable[str]) -> list[dict]:
    """Rows of a JSON-lines file, each an object with string values for ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    rows = []
    keys = list(required)
    for lineno, obj in json_objects(path, path.read_text(encoding="utf-8")):
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in keys):
            raise ConfigError(f"{path}:{lineno}: expected an object with string {keys}")
        rows.append(obj)
    if not rows:
        raise ConfigError(f"{path}: no records")
    return rows
