"""What every checkpoint-to-checkpoint transform (merge, LoRA merge, prune) sets up the same way.

* :func:`rewrite_checkpoint`: :func:`~weightsmith.core.streaming.stream_transform` with the
  output options bundled (:class:`WriteOptions`), support files and config taken from one
  reference checkpoint, and every input recorded in the provenance.
* Nothing non-finite goes through unnoticed: :func:`require_finite` for tensors a method reads,
  :func:`checked_chunks` / :func:`checked_copy` for tensors copied as stored bytes (checked as
  they stream through, so a copy costs one read, not two).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from weightsmith.core.streaming import Group, RawTensor, StreamResult, stream_transform
from weightsmith.errors import CheckpointError
from weightsmith.io.reader import Checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec

# One vectorized pass, no copy: torch's min/max reductions propagate NaN, and an Inf is itself
# the minimum or maximum, so both are finite iff every value is (tested per position).
_MINMAX = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
CHECK_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class WriteOptions:
    """How an output checkpoint is written (the options every transform command shares)."""

    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    force: bool = False
    progress: bool = True


def all_finite(t: torch.Tensor) -> bool:
    """True when the floating tensor ``t`` holds no NaN/Inf (non-float tensors: always)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in _MINMAX:
        lo, hi = torch.aminmax(t)
        return math.isfinite(float(lo)) and math.isfinite(float(hi))
    return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())


def require_finite(t: torch.Tensor, where: str, name: str) -> torch.Tensor:
    """``t`` unchanged, or a CheckpointError naming ``where`` (a file or folder) and tensor
    ``name`` when it holds NaN/Inf."""
    if not all_finite(t):
        raise CheckpointError(f"{where}: tensor {name!r} holds NaN or Inf values")
    return t


def checked_chunks(ckpt: Checkpoint, name: str) -> Iterator[bytes]:
    """The stored bytes of tensor ``name`` (as :meth:`Checkpoint.raw_chunks`), each chunk
    checked for NaN/Inf before it is handed on (floating tensors)."""
    info = ckpt.info(name)
    dtype = info.torch_dtype
    if not dtype.is_floating_point:
        yield from ckpt.raw_chunks(name)
        return
    step = max(1, CHECK_CHUNK_BYTES // dtype.itemsize) * dtype.itemsize
    for chunk in ckpt.raw_chunks(name, chunk_size=step):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: only read here
            values = torch.frombuffer(chunk, dtype=dtype) if chunk else torch.empty(0, dtype=dtype)
        require_finite(values, str(ckpt.path), name)
        yield chunk


def checked_copy(ckpt: Checkpoint, name: str, new_name: str | None = None) -> tuple[str, RawTensor]:
    """Tensor ``name`` copied bit-exactly (optionally renamed) as ``(name, value)``, with its
    bytes checked for NaN/Inf on the way (non-float tensors: copied in the kernel)."""
    info = ckpt.info(name)
    if not info.torch_dtype.is_floating_point:
        raw = RawTensor.of(ckpt, name, new_name)
    else:
        spec = TensorSpec(new_name or name, info.torch_dtype, info.shape)
        raw = RawTensor(spec, lambda: checked_chunks(ckpt, name))
    return raw.spec.name, raw


def dtype_patch(dtype_name: str) -> Callable[[dict], dict]:
    """A config patch that records ``dtype_name`` as the model's dtype (``dtype`` and/or
    ``torch_dtype``, whichever the config uses)."""

    def patch(config: dict) -> dict:
        for k in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
            config[k] = dtype_name
        return config

    return patch


def rewrite_checkpoint(
    reference: Checkpoint,
    groups: Sequence[Group],
    out: str | os.PathLike[str],
    *,
    plan: Callable[[Group], list[TensorSpec]] | None,
    apply: Callable[[Group], Iterable[tuple[str, torch.Tensor | RawTensor]]],
    options: WriteOptions,
    description: str,
    provenance: dict,
    sources: Sequence[Checkpoint] | None = None,
    config_patch: dict | Callable[[dict], dict] | None = None,
    before_commit: Callable[[CheckpointWriter], None] | None = None,
    support_skip: Iterable[str] = (),
) -> StreamResult:
    """Write ``apply`` over ``groups`` to ``out`` with ``reference``'s config (patched) and
    support files (but ``support_skip``); ``sources`` (default: the reference alone) are the
    inputs on record."""
    return stream_transform(
        groups,
        out,
        plan=plan,
        apply=apply,
        sources=[reference] if sources is None else list(sources),
        support_from=reference.root,
        support_skip=support_skip,
        config_patch=config_patch,
        max_shard_size=options.max_shard_size,
        force=options.force,
        provenance=provenance,
        progress=options.progress,
        description=description,
        before_commit=before_commit,
    )
