"""BitNet b1.58 ternary PTQ (``--method ternary``) and the reference BitLinear forward.

A ternary weight is a :class:`QuantizedWeight` with levels ``q`` in {-1, 0, 1} (int8,
``(out, in)``), one scale per tensor ``γ = mean|W|`` held as a float32 ``(1, 1)`` ``scale``
(so ``dequantize()`` gives ``q · γ``), a ``(1, 1)`` zero of 0, ``bits=2`` (its storage width)
and ``group_size=in``. The output format decides how ``γ`` is stored (``bitnet_format``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.compress.registry import MethodConfig, QuantizedWeight, quant_method
from weightsmith.compress.ternary_math import absmax_int8, absmean_ternary


@dataclass(frozen=True)
class TernaryConfig(MethodConfig):
    """``--method ternary``: {-1, 0, 1} with one scale per tensor (no bits, no groups)."""

    def describe(self) -> dict:
        return {"bits": 1.58, "group_size": -1, "symmetric": True}  # log2(3), stored as 2 bits


@quant_method("ternary", config=TernaryConfig, formats=("bitnet",),
              summary="BitNet b1.58 absmean ternary {-1,0,1}, one scale per tensor")  # fmt: skip
def ternary_quantize(
    w: torch.Tensor, cfg: TernaryConfig | None = None, stat: torch.Tensor | None = None, *,
    dtype: torch.dtype | None = None, zero_min: int | None = None,
) -> QuantizedWeight:  # fmt: skip
    """``W̃ = clip(round(W / γ), -1, 1)``, ``γ = mean|W|`` per tensor (the BitNet b1.58 PTQ)."""
    q, gamma = absmean_ternary(w)
    return QuantizedWeight(
        q=q,
        scale=gamma.reshape(1, 1),  # float32: the format rounds it to the stored dtype
        zero=torch.zeros(1, 1, dtype=torch.int8),
        bits=2,
        group_size=w.shape[1],
        symmetric=True,
        info={"gamma": float(gamma), "zeros": int((q == 0).sum())},
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' ``LlamaRMSNorm`` computes it (float32 inside, weight after)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


def bitlinear_reference(
    x: torch.Tensor,
    q: torch.Tensor,
    gamma: torch.Tensor | float,
    bias: torch.Tensor | None = None,
    rms_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """BitNet b1.58 inference of one Linear: ``y = (x̃ · W̃ᵀ) · γ / m + b``.

    ``x`` is optionally RMS-normed, then quantized per token to int8 levels ``x̃`` with
    multiplier ``m = 127 / max|x|``; ``W̃`` are the ternary levels ``(out, in)``. The integer
    product is exact in float32 while ``127 · in < 2^24``."""
    if rms_norm_weight is not None:
        x = rms_norm(x, rms_norm_weight, eps)
    levels, mult = absmax_int8(x)
    acc = levels @ q.float().t()  # integer-valued (…, out)
    y = acc / mult * torch.as_tensor(gamma, dtype=torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
