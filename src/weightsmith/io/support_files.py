"""The files that travel with the weights (config, tokenizer, generation settings)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from weightsmith.errors import CheckpointError
from weightsmith.io.paths import checked_member

# Files that travel with the weights: config, generation settings, tokenizer, chat template.
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# The ones a tokenizer's ``save_pretrained`` owns (replaced as a set when a merge writes its own).
TOKENIZER_FILES = tuple(
    n for n in SUPPORT_FILES if n not in ("config.json", "generation_config.json")
)


def copy_support_files(
    src_dir: Path,
    dst_dir: Path,
    io: Callable[[Path, Callable[[], object]], object],
    config_patch: dict | Callable[[dict], dict] | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Copy the support files ``src_dir`` has into ``dst_dir`` (``io`` runs each write and
    names the file on failure); config.json is patched on the way when asked."""
    copied = []
    for name in SUPPORT_FILES:
        src = src_dir / name
        if name in skip or not src.is_file():
            continue
        checked_member(src_dir, name, str(src_dir))
        if name == "config.json" and config_patch is not None:
            try:
                config = json.loads(src.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{src}: unreadable config ({e})") from None
            config = config_patch(config) if callable(config_patch) else {**config, **config_patch}
            text = json.dumps(config, indent=2, sort_keys=False) + "\n"
            io(dst_dir / name, lambda t=text, n=name: (dst_dir / n).write_text(t, encoding="utf-8"))
        else:
            io(dst_dir / name, lambda s=src, n=name: shutil.copyfile(s, dst_dir / n))
        copied.append(name)
    return copied
