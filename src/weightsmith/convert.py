"""``weightsmith convert``: re-shard and/or cast a checkpoint through the streaming layer."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from weightsmith.core.streaming import RawTensor, StreamResult
from weightsmith.core.transform import WriteOptions, dtype_patch, rewrite_checkpoint
from weightsmith.errors import CheckpointError
from weightsmith.io.dtypes import config_dtype_name, parse_user_dtype
from weightsmith.io.reader import TensorGroup, open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec

CASTABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class ConvertConfig:
    """Options of a conversion, recorded in the output's ``weightsmith.json``."""

    dtype: str | None = None  # None keeps every tensor's stored dtype (bit-exact copy)
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    version: int = 1


def convert(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> StreamResult:
    """Copy ``path`` to ``out`` one tensor at a time, optionally casting floating tensors.

    Without ``dtype`` the stored bytes are copied unchanged; with it, float tensors are cast
    (integer, boolean and float8 tensors are kept: casting them would corrupt quantized data)
    and config.json's dtype is updated. Casting to float16 refuses values it cannot represent.
    """
    target = parse_user_dtype(dtype) if dtype else None
    cfg = ConvertConfig(
        dtype=config_dtype_name(target) if target else None, max_shard_size=max_shard_size
    )
    with open_checkpoint(path, allow_pickle=allow_pickle) as ckpt:

        def out_dtype(name: str) -> torch.dtype:
            stored = ckpt.info(name).torch_dtype
            return target if target is not None and stored in CASTABLE else stored

        def plan(group: TensorGroup) -> list[TensorSpec]:
            return [TensorSpec(n, out_dtype(n), ckpt.info(n).shape) for n in group.names]

        def apply(group: TensorGroup):
            for name in group.names:
                info = ckpt.info(name)
                want = out_dtype(name)
                if want == info.torch_dtype:
                    yield name, RawTensor.of(ckpt, name)
                else:
                    yield name, _cast(ckpt.get_tensor(name), want, name)

        patch = None
        if target is not None:
            patch = dtype_patch(config_dtype_name(target))
        return rewrite_checkpoint(
            ckpt,
            ckpt.groups("layer"),  # embeddings, layer 0, 1, ... : each layer stays together
            out,
            plan=plan,
            apply=apply,
            options=WriteOptions(max_shard_size, force, progress),
            description="convert",
            provenance={"operation": "convert", "config": asdict(cfg)},
            config_patch=patch,
        )


def convert_gguf(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    type_name: str = "F16",
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
):
    """Write ``path`` as one llama.cpp GGUF file (see :mod:`weightsmith.ggml.writer`)."""
    from weightsmith.ggml.writer import write_gguf

    return write_gguf(
        path, out, type_name=type_name, force=force, allow_pickle=allow_pickle, progress=progress
    )


def _cast(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if dtype == torch.float16 and t.is_floating_point() and t.numel():
        low, high = torch.aminmax(t)  # one pass; NaN stays NaN and is not an overflow
        limit = torch.finfo(torch.float16).max
        if high.item() > limit or low.item() < -limit:
            finite = t[torch.isfinite(t)].abs()
            peak = finite.max().item() if finite.numel() else 0.0
            if peak > limit:
                raise CheckpointError(
                    f"tensor {name!r}: values up to {peak:.4g} overflow float16 "
                    f"(max 65504); use --dtype bfloat16"
                )
    return t.to(dtype)
