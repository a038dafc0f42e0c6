"""Device selection for every command that runs a model (one rule: ``auto`` = CUDA if present)."""

from __future__ import annotations

import torch

from weightsmith.errors import ConfigError


def select_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other name as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown --device {device!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s)")
    return dev


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively: CUDA with bfloat16 support,
    or a CPU with AVX512-BF16 or AMX (elsewhere torch emulates them, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False
