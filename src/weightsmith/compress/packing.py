"""Bit packing of integer levels into int32 words, exactly as the target formats store them.

- :func:`pack_int32` / :func:`unpack_int32`: compressed-tensors ``pack-quantized`` (>= 0.20):
  levels are offset to unsigned (``q + 2^(b-1)``) and packed densely along a dimension; element
  ``i`` occupies bits ``[i·b, i·b + b)`` of the row's bit stream, low bits first, a value may
  straddle two words, and each row is padded to a whole number of words (for 4 and 8 bits this
  is the classic "element j of a word at bits 4j" layout).
- :func:`pack_rows_gptq`: the AutoGPTQ/GPTQModel layout, ``32 / b`` unsigned values per int32
  along dim 0 (``qweight``: input features) or dim 1 (``qzeros``: output features).
"""

from __future__ import annotations

import math

import torch

from weightsmith.kernels.quant import pack_rows


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed int8 levels ``(rows, cols)`` densely into int32 along ``dim``."""
    if dim == 0:
        return pack_int32(q.t(), bits, 1).t().contiguous()
    packed = pack_rows(q, bits)  # native, same words (contiguous int8 on the CPU)
    if packed is not None:
        return packed
    rows, cols = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    words = math.ceil(cols * bits / 32)
    pos = torch.arange(cols, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    out.scatter_add_(1, word.expand(rows, -1), (u << off) & 0xFFFFFFFF)
    spill = off + bits > 32
    if spill.any():
        out.scatter_add_(1, (word[spill] + 1).expand(rows, -1), u[:, spill] >> (32 - off[spill]))
    return _to_int32(out[:, :words])


def unpack_int32(packed: torch.Tensor, bits: int, cols: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: signed int8 levels with ``cols`` entries along ``dim``."""
    if dim == 0:
        return unpack_int32(packed.t(), bits, cols, 1).t().contiguous()
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros(p.shape[0], 1, dtype=torch.int64)], 1)
    pos = torch.arange(cols, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    v = (p[:, word] >> off) | (p[:, word + 1] << (32 - off))
    v = v & ((1 << bits) - 1)
    return (v - (1 << (bits - 1))).to(torch.int8)


def pack_rows_gptq(u: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned levels ``32 / bits`` per int32 along ``dim`` (AutoGPTQ layout, bits 2/4/8)."""
    if 32 % bits:
        raise ValueError(f"the gptq layout packs 2, 4 or 8 bits, not {bits}")
    per = 32 // bits
    x = u.to(torch.int64) if dim == 0 else u.to(torch.int64).t()
    n = x.shape[0]
    if n % per:
        raise ValueError(f"dimension {n} is not a multiple of {per}")
    x = x.reshape(n // per, per, -1)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    words = (x << shifts).sum(1)
    words = _to_int32(words)
    return words if dim == 0 else words.t().contiguous()


def unpack_rows_gptq(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows_gptq` (unsigned levels as int64)."""
    per = 32 // bits
    w = (
        (words.to(torch.int64) & 0xFFFFFFFF)
        if dim == 0
        else (words.to(torch.int64) & 0xFFFFFFFF).t()
    )
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    x = ((w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, w.shape[-1])
    return x if dim == 0 else x.t().contiguous()
