"""The safetensors dtype table: names, torch dtypes and item sizes."""

from __future__ import annotations

import torch

from weightsmith.errors import CheckpointError

# safetensors dtype name -> torch dtype, in the order of safetensors' Rust ``Dtype`` enum.
# ``save_file`` sorts tensors by this order (descending, then by name), so we keep it to
# produce byte-identical files.
_ORDERED: list[tuple[str, torch.dtype]] = [
    ("BOOL", torch.bool),
    ("U8", torch.uint8),
    ("I8", torch.int8),
    ("F8_E5M2", torch.float8_e5m2),
    ("F8_E4M3", torch.float8_e4m3fn),
    ("I16", torch.int16),
    ("U16", torch.uint16),
    ("F16", torch.float16),
    ("BF16", torch.bfloat16),
    ("I32", torch.int32),
    ("U32", torch.uint32),
    ("F32", torch.float32),
    ("F64", torch.float64),
    ("I64", torch.int64),
    ("U64", torch.uint64),
]

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = dict(_ORDERED)
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {t: s for s, t in _ORDERED}
DTYPE_RANK: dict[str, int] = {s: i for i, (s, _) in enumerate(_ORDERED)}

# Names users may pass on the command line (``--dtype``).
USER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return torch_dtype(dtype).itemsize


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype name, or a clear error."""
    try:
        return SAFETENSORS_TO_TORCH[dtype]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {dtype!r}") from None


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype name for a torch dtype, or a clear error."""
    try:
        return TORCH_TO_SAFETENSORS[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def parse_user_dtype(name: str) -> torch.dtype:
    """Map ``bfloat16``/``float16``/``float32`` (and short forms) to a torch dtype."""
    try:
        return USER_DTYPES[name.lower()]
    except KeyError:
        choices = ", ".join(sorted({"float32", "float16", "bfloat16"}))
        raise CheckpointError(f"unknown dtype {name!r} (choose from {choices})") from None


def config_dtype_name(dtype: torch.dtype) -> str:
    """The name transformers writes in config.json for a torch dtype (``bfloat16``)."""
    return str(dtype).removeprefix("torch.")
