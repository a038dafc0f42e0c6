"""8-bit weights with one absmax scale per output channel or per 2-D block (FP8-E4M3 and int8),
computed exactly as llm-compressor's ``model_free_ptq`` does (compressed-tensors' static min-max
observer and ``quantize``), so the stored tensors are bit-identical to its output:

- every step runs in the weight's own dtype (bf16 stays bf16: ``w / scale`` is rounded to bf16
  before it is rounded to the 8-bit grid, as compressed-tensors does);
- ``scale = max(|min(w, 0)|, max(w, 0)) / (range / 2)``: ``range`` is ``448 - (-448)`` for
  FP8-E4M3 (so ``/ 448``) and ``127 - (-128)`` for int8 (so ``/ 127.5``); a zero scale becomes
  the dtype's machine epsilon;
- blocks: the weight is zero-padded to whole blocks (``ceil(out / b0) × ceil(in / b1)``
  scales), quantized padded and cut back to its shape;
- levels: ``clamp(w / scale, qmin, qmax)`` cast to ``float8_e4m3fn`` (round to nearest even)
  or rounded half-to-even to int8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype compressed-tensors stores a weight's scales in: the weight's own float dtype,
    float16 for anything else."""
    return dtype if dtype in SCALE_DTYPES else torch.float16


def level_bounds(kind: str) -> tuple[float, float]:
    """``(qmin, qmax)`` of the 8-bit grid ``kind`` ("fp8" or "int8")."""
    return (-FP8_MAX, FP8_MAX) if kind == "fp8" else (-128.0, 127.0)


def scale_shape(shape: tuple[int, int], block: tuple[int, int] | None) -> tuple[int, int]:
    """Shape of the stored ``weight_scale``: ``(out, 1)`` per channel, else one per block."""
    out_f, in_f = shape
    if block is None:
        return (out_f, 1)
    return (math.ceil(out_f / block[0]), math.ceil(in_f / block[1]))


def _blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``(rb, cb, b0, b1)`` view of ``w`` zero-padded to whole blocks."""
    (out_f, in_f), (b0, b1) = w.shape, block
    rb, cb = math.ceil(out_f / b0), math.ceil(in_f / b1)
    w = F.pad(w, (0, cb * b1 - in_f, 0, rb * b0 - out_f))
    return w.reshape(rb, b0, cb, b1).transpose(1, 2)


def absmax_scale(w: torch.Tensor, kind: str, block: tuple[int, int] | None) -> torch.Tensor:
    """Symmetric min-max scale of ``w`` (in ``w``'s dtype), shaped as :func:`scale_shape`."""
    if block is None:
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    else:
        b = _blocks(w, block).flatten(-2)
        lo, hi = b.amin(dim=-1), b.amax(dim=-1)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    qmin, qmax = level_bounds(kind)
    half = torch.tensor(qmax - qmin, dtype=w.dtype) / 2
    scale = torch.maximum(lo.abs(), hi.abs()) / half
    eps = torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype)
    return torch.where(scale == 0, eps, scale)


def _round(x: torch.Tensor, kind: str) -> torch.Tensor:
    qmin, qmax = level_bounds(kind)
    x = x.clamp(qmin, qmax)
    return x.to(FP8) if kind == "fp8" else torch.round(x).to(torch.int8)


def quantize_scaled(
    w: torch.Tensor, scale: torch.Tensor, kind: str, block: tuple[int, int] | None
) -> torch.Tensor:
    """8-bit levels of ``w`` for ``scale`` (``float8_e4m3fn`` or int8, ``w``'s shape)."""
    if block is None:
        return _round(w / scale, kind)
    b = _blocks(w, block)
    q = _round(b / scale[..., None, None], kind)
    rb, cb, b0, b1 = q.shape
    return q.transpose(1, 2).reshape(rb * b0, cb * b1)[: w.shape[0], : w.shape[1]].contiguous()


def dequantize_scaled(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None
) -> torch.Tensor:
    """``q · scale`` in float32 (``scale`` expanded over its channel or block)."""
    s = scale.float()
    if block is not None:
        s = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        s = s[: q.shape[0], : q.shape[1]]
    return q.float() * s


@dataclass
class ScaledWeight:
    """An 8-bit weight: levels ``q`` (``float8_e4m3fn`` or int8, ``(out, in)``) and ``scale``
    (the weight's float dtype; ``(out, 1)`` per channel or one per ``block``)."""

    q: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int] | None = None
    info: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        return dequantize_scaled(self.q, self.scale, self.block)


def scaled_quantize(w: torch.Tensor, kind: str, block: tuple[int, int] | None) -> ScaledWeight:
    """Absmax-scaled 8-bit quantization of a float ``(out, in)`` weight (see module doc)."""
    w = w.to(scale_dtype(w.dtype))
    scale = absmax_scale(w, kind, block)
    return ScaledWeight(quantize_scaled(w, scale, kind, block), scale, block)
