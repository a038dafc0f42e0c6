"""Device selection for every command that runs a model (one rule: ``auto`` = CUDA if present)."""

from __future__ import annotations

import torch

from weightsmith.errors import ConfigError


def select_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other name as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown --device {device!r}") from None
