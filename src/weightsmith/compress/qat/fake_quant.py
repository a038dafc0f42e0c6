"""Fake quantization for QAT: the exact RTN quantize→dequantize, with a straight-through gradient.

Weights are fake-quantized with the same functions ``compress quantize --method rtn`` uses
(:func:`~weightsmith.compress.rtn.group_qparams`, :func:`quantize_levels`, :func:`dequantize`),
including rounding the scales to the dtype they are stored in, so the trained model's forward
equals the converted checkpoint's forward. The gradient is the plain straight-through estimator
(identity): min-max scales cover every weight, so nothing is clipped and a clipped STE would
differ only at the one level a symmetric grid cannot reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.compress.rtn import dequantize, group_qparams, level_range, quantize_levels


@dataclass(frozen=True)
class WeightSpec:
    """How one Linear's weight is fake-quantized (mirrors the QuantConfig of the conversion)."""

    bits: int
    group_size: int  # -1: per output channel
    symmetric: bool
    scale_dtype: torch.dtype  # the dtype the format stores scales in (rounded before use)
    store_dtype: torch.dtype  # the checkpoint dtype the trained weight is saved in
    zero_min: int | None = None  # see rtn.zero_min_for (gptq asymmetric)


def fake_quantize_weight(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """``dequantize(rtn_quantize(w))`` as float32, ``w`` first rounded to its storage dtype."""
    wf = w.detach().to(spec.store_dtype).float()
    in_f = wf.shape[1]
    g = in_f if spec.group_size == -1 else spec.group_size
    scale, zero = group_qparams(wf, spec.bits, g, spec.symmetric, spec.scale_dtype, spec.zero_min)
    idx = torch.arange(in_f, device=wf.device) // g
    q = quantize_levels(wf, scale[:, idx], zero[:, idx], spec.bits)  # (out, in) int8
    return dequantize(q, scale, zero, g, idx)


def fake_quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token (last dim) symmetric ``bits``-bit quantize→dequantize (dynamic absmax scale)."""
    _, qmax = level_range(bits)
    xf = x.float()
    mult = qmax / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (torch.clamp(torch.round(xf * mult), -qmax - 1, qmax) / mult).to(x.dtype)


class LerpSTE(torch.autograd.Function):
    """Forward ``x + λ·(xq − x)`` (exactly ``xq`` at λ = 1); backward: identity to ``x``.

    λ < 1 is the Hugging Face 1.58-bit recipe's warm-up of quantization strength; λ = 1 is the
    plain straight-through estimator.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, xq: torch.Tensor, lam: float) -> torch.Tensor:
        xq = xq.to(x.dtype)
        return xq.clone() if lam >= 1.0 else torch.lerp(x.detach(), xq, lam)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def ste(x: torch.Tensor, xq: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """``xq`` in the forward (blended with ``x`` by ``lam``), the gradient of ``x`` backward."""
    return LerpSTE.apply(x, xq.detach(), float(lam))


def fake_quant_weight_ste(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Fake-quantized weight for the forward, straight-through gradient to ``w``."""
    return ste(w, fake_quantize_weight(w, spec))


def fake_quant_activation_ste(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantized activations for the forward, straight-through gradient to ``x``."""
    return ste(x, fake_quantize_activation(x, bits))
