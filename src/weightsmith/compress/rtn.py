"""Round-to-nearest quantization: min-max qparams per output channel or per input group.

Conventions follow compressed-tensors (and the GPTQ reference, shifted to signed levels):
symmetric ``scale = 2·max|w| / (2^b - 1)``, zero 0; asymmetric ``scale = (max - min) / (2^b - 1)``,
``zero = round(qmin - min / scale)``, with the range widened to include 0 in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.compress.hqq import HQQParams, hqq_qparams
from weightsmith.compress.levels import (  # dequantize: re-exported
    QuantizedWeight,
    dequantize,  # noqa: F401
    level_range,
)
from weightsmith.compress.registry import GridConfig, quant_method
from weightsmith.errors import ConfigError
from weightsmith.kernels.quant import Scratch, fake_quant_scaled, rtn_rows


def minmax_qparams(
    w: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``w`` (rows are channels, or groups reshaped to rows).

    Returns float scale and float (already rounded) zero, both ``(rows, 1)``.
    """
    qmin, qmax = level_range(bits)
    lo = w.min(dim=-1, keepdim=True).values.clamp(max=0)
    hi = w.max(dim=-1, keepdim=True).values.clamp(min=0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.zeros_like(scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows
    if not symmetric:
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def quantize_levels(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """``clamp(round(w / scale) + zero)`` as int8 levels (broadcasting scale/zero)."""
    qmin, qmax = level_range(bits)
    return torch.clamp(torch.round(w / scale) + zero, qmin, qmax).to(torch.int8)


def group_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    dtype: torch.dtype,
    zero_min: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams ``(out, n_groups)`` of a ``(out, in)`` weight; scales are rounded to
    the output ``dtype`` first so quantization uses exactly the scale that is stored.
    ``zero_min`` raises the lowest allowed zero point (the gptq v1 format cannot store the
    lowest level as zero, since it keeps ``zero - 1`` unsigned)."""
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    scale, zero = minmax_qparams(w.float().reshape(out_f * (in_f // g), g), bits, symmetric)
    scale = scale.to(dtype).float().reshape(out_f, in_f // g)
    zero = zero.reshape(out_f, in_f // g)
    if not symmetric:  # recompute the zero for the rounded scale
        lo = w.float().reshape(out_f, in_f // g, g).min(-1).values.clamp(max=0)
        qmin, qmax = level_range(bits)
        zero = torch.clamp(torch.round(qmin - lo / scale), zero_min or qmin, qmax)
    return scale, zero


def zero_min_for(cfg: Any) -> int | None:
    """The lowest zero point ``cfg``'s output format can store (see :func:`group_qparams`);
    ``cfg`` is a :class:`~weightsmith.compress.registry.QuantConfig` (method options alone
    name no format: None)."""
    from weightsmith.compress.registry import FORMATS

    fmt = FORMATS.get(getattr(cfg, "format", None) or "")
    return fmt.zero_min(cfg.options) if fmt is not None else None


@dataclass(frozen=True)
class RTNConfig(GridConfig):
    """``--method rtn``: min-max qparams per channel or group; ``hqq`` refines them by HQQ's
    data-free half-quadratic solver (:mod:`weightsmith.compress.hqq`)."""

    hqq: bool = False
    hqq_iters: int = 20

    def validate(self) -> None:
        super().validate()
        if self.hqq_iters < 1:
            raise ConfigError(f"--hqq-iters must be positive (got {self.hqq_iters})")


@quant_method(
    "rtn",
    config=RTNConfig,
    summary="round-to-nearest, min-max per channel or group (no calibration)",
    scratch=True,
)
def rtn_quantize(
    w: torch.Tensor, cfg: GridConfig, stat: torch.Tensor | None = None, *,
    dtype: torch.dtype | None = None, zero_min: int | None = None,
    scratch: Scratch | None = None,
) -> QuantizedWeight:  # fmt: skip
    """Round every weight to its nearest level with min-max qparams (scales rounded to
    ``dtype``; zero points >= ``zero_min``, default: what ``cfg``'s format allows).

    Plain min-max RTN of a CPU bfloat16/float32 weight runs one native pass (same bits as the
    torch code below); with ``scratch`` its levels live in the reused buffer ``"rtn.q"``, valid
    until the next call with the same scratch."""
    dtype = dtype or w.dtype
    zero_min = zero_min if zero_min is not None else zero_min_for(cfg)
    in_f = w.shape[1]
    g = in_f if cfg.group_size == -1 else cfg.group_size
    hqq = getattr(cfg, "hqq", False)
    if not hqq:
        shape = tuple(w.shape)
        q = (
            scratch.take("rtn.q", shape, torch.int8)
            if scratch
            else torch.empty(shape, dtype=torch.int8)
        )
        fast = rtn_rows(w, g, cfg.bits, cfg.symmetric, zero_min, dtype, q)
        if fast is not None:
            return QuantizedWeight(q=q, scale=fast[0], zero=fast[1], bits=cfg.bits,
                                   group_size=g, symmetric=cfg.symmetric)  # fmt: skip
    scale, zero = group_qparams(w, cfg.bits, g, cfg.symmetric, dtype, zero_min)
    info: dict = {}
    if hqq:
        params = HQQParams(iters=cfg.hqq_iters)
        s, z, info = hqq_qparams(
            w.float().reshape(-1, g), scale.reshape(-1, 1), zero.reshape(-1, 1), cfg.bits,
            cfg.symmetric, dtype=dtype, zero_min=zero_min, params=params,
        )  # fmt: skip
        scale, zero = s.reshape(scale.shape), z.reshape(zero.shape)
    idx = torch.arange(in_f) // g
    q = quantize_levels(w.float(), scale[:, idx], zero[:, idx], cfg.bits)
    return QuantizedWeight(
        q=q,
        scale=scale.to(dtype),
        zero=zero.to(torch.int8),
        bits=cfg.bits,
        group_size=g,
        symmetric=cfg.symmetric,
        info=info,
    )


def rtn_scaled_dequantized(
    w: torch.Tensor, s: torch.Tensor | None, cfg: GridConfig, *,
    dtype: torch.dtype | None = None, zero_min: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``rtn_quantize(w·s).dequantize() / s`` as float32 (AWQ's candidate weight for input
    column scales ``s``; None: ``rtn_quantize(w).dequantize()``): one native pass for plain min-max RTN on the CPU, else the torch
    code, with the same bits (``w·s`` and the quotient in ``s``'s precision or float32; scales
    rounded to ``dtype``, default float32 as for the float32 ``w·s``). The native pass writes
    into ``out`` when given (see :func:`~weightsmith.kernels.quant.fake_quant_scaled`); check
    whether the result ``is out``."""
    dtype = dtype or torch.float32
    zero_min = zero_min if zero_min is not None else zero_min_for(cfg)
    g = w.shape[1] if cfg.group_size == -1 else cfg.group_size
    if not getattr(cfg, "hqq", False):
        fast = fake_quant_scaled(w, s, g, cfg.bits, cfg.symmetric, zero_min, dtype, out)
        if fast is not None:
            return fast
    if s is None:
        return rtn_quantize(w.float(), cfg, dtype=dtype, zero_min=zero_min).dequantize()
    deq = rtn_quantize((w * s).float(), cfg, dtype=dtype, zero_min=zero_min).dequantize()
    return (deq / s).float()
