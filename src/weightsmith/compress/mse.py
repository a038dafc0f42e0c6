"""MSE-optimal clipping: RTN whose range is shrunk, per group, to minimise ``||W - Q(W)||²``.

Min-max RTN spends its levels on the largest weight of each group; clipping the range trades a
larger error on that outlier for a finer step on every other weight. For each group this tries
the ranges ``p · [min, max]`` with ``p = 1, 1 - 1/grid, …, 1 - max_shrink`` and keeps the ``p``
with the smallest squared reconstruction error (the first on ties), as the ``mse`` observers of
llm-compressor and GPTQModel do. ``p = 1`` is plain RTN, so no group gets worse. Data-free; it
writes the same integer grid as RTN, so every integer format stores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from weightsmith.compress.registry import GridConfig, QuantizedWeight, quant_method
from weightsmith.compress.rtn import group_qparams, quantize_levels, zero_min_for
from weightsmith.errors import ConfigError
from weightsmith.kernels.quant import mse_rows


@dataclass(frozen=True)
class MSEConfig(GridConfig):
    """``--method mse``: the grid options plus the clipping search."""

    observer: ClassVar[str] = "mse"
    grid: int = 100  # candidate ranges are 1 - i/grid
    max_shrink: float = 0.2  # the smallest range tried is (1 - max_shrink) · [min, max]

    def validate(self) -> None:
        super().validate()
        if self.grid < 1:
            raise ConfigError(f"--grid must be positive (got {self.grid})")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"--max-shrink must be in [0, 1) (got {self.max_shrink})")


def clip_ratios(cfg: MSEConfig) -> list[float]:
    """The range ratios tried, largest first: ``1 - i/grid`` down to ``1 - max_shrink``."""
    return [1 - i / cfg.grid for i in range(int(cfg.max_shrink * cfg.grid + 1e-9) + 1)]


def mse_qparams(
    w: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype,
    zero_min: int | None, ratios: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Qparams ``(rows, 1)`` of each row of ``w`` ``(rows, g)``: the min-max qparams (scale
    rounded to ``dtype``) of ``p · [min, max]`` for the ``p`` in ``ratios`` with the least
    ``||w - Q(w)||²`` (the first on ties); also the chosen ratios ``(rows, 1)``. Each error
    term is float32, their sum float64. The native kernel gives the same choices (tested)."""
    wf = w.float()
    native = mse_rows(wf, bits, symmetric, zero_min, dtype, ratios)
    if native is not None:
        return native
    best_err = best_scale = best_zero = None
    chosen = torch.ones(wf.shape[0], 1, device=wf.device)
    for p in ratios:
        # min-max of p·W is p·[min, max]: the clipped range, rounded to the stored dtype
        scale, zero = group_qparams(wf * p, bits, -1, symmetric, dtype, zero_min)
        q = quantize_levels(wf, scale, zero, bits)
        err = ((q.float() - zero) * scale - wf).pow(2).double().sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            chosen = torch.full(err.shape, p, device=err.device)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        chosen = torch.where(better, torch.full_like(chosen, p), chosen)
    return best_scale, best_zero, chosen


@quant_method("mse", config=MSEConfig,
              summary="RTN with the per-group clipping range that minimises the squared error")  # fmt: skip
def mse_quantize(
    w: torch.Tensor, cfg: MSEConfig, stat: torch.Tensor | None = None, *,
    dtype: torch.dtype | None = None, zero_min: int | None = None,
) -> QuantizedWeight:  # fmt: skip
    """Min-max qparams of each group's range scaled by the ratio with the least error."""
    dtype = dtype or w.dtype
    zero_min = zero_min if zero_min is not None else zero_min_for(cfg)
    wf = w.float()
    out_f, in_f = wf.shape
    g = in_f if cfg.group_size == -1 else cfg.group_size
    idx = torch.arange(in_f) // g
    rows = wf.reshape(out_f * (in_f // g), g)
    scale, zero, ratios = mse_qparams(rows, cfg.bits, cfg.symmetric, dtype, zero_min,
                                      clip_ratios(cfg))  # fmt: skip
    scale, zero = scale.reshape(out_f, in_f // g), zero.reshape(out_f, in_f // g)
    q = quantize_levels(wf, scale[:, idx], zero[:, idx], cfg.bits)
    return QuantizedWeight(
        q=q, scale=scale.to(dtype), zero=zero.to(torch.int8), bits=cfg.bits,
        group_size=g, symmetric=cfg.symmetric,
        info={"mean_clip_ratio": float(ratios.mean())},
    )  # fmt: skip
