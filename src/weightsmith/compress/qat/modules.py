"""Training Linears: fake-quant (QAT) and BitLinear (BitNet b1.58), and the swap that installs them.

Both subclass ``nn.Linear`` and keep its ``weight``/``bias`` parameters under the same names,
so the trained model's state dict maps 1:1 onto the original checkpoint's tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.compress.qat.fake_quant import (
    WeightSpec,
    fake_quant_activation_ste,
    fake_quant_weight_ste,
    ste,
)
from weightsmith.compress.ternary_math import absmax_int8, absmean_ternary


class FakeQuantLinear(nn.Linear):
    """A Linear whose forward uses the RTN-fake-quantized weight (and optionally activations)."""

    spec: WeightSpec
    act_bits: int | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = fake_quant_activation_ste(x, self.act_bits)
        w = fake_quant_weight_ste(self.weight, self.spec)
        return F.linear(x, w, self.bias)


def ternary_weight(w: torch.Tensor) -> torch.Tensor:
    """Absmean ternary quantize→dequantize ``levels · γ`` (float32)."""
    q, gamma = absmean_ternary(w.detach())
    return q.float() * gamma


def int8_activation(x: torch.Tensor) -> torch.Tensor:
    """Absmax int8 per-token quantize→dequantize ``levels / multiplier`` (float32)."""
    levels, mult = absmax_int8(x.detach())
    return levels / mult


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm computed as transformers' ``LlamaRMSNorm`` does (float32 inside)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype)


def bitnet_inference(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, linear_class: str
) -> torch.Tensor:
    """Ternary inference of one Linear with the operations, in the order, of transformers'
    ``BitLinear`` (``x̃W̃ᵀ / (m · weight_scale)``, scale ``1/γ``) or ``AutoBitLinear``
    (``(x̃/m)W̃ᵀ · weight_scale``, scale ``γ``, bias stored as ``b/γ``), scales rounded as stored."""
    from weightsmith.compress.bitnet_format import stored_scale

    q, gamma = absmean_ternary(w)
    levels, mult = absmax_int8(x)
    dtype = x.dtype
    scale = stored_scale(gamma, linear_class, w.dtype).to(dtype)
    if linear_class == "bitlinear":
        y = F.linear(levels.to(dtype), q.to(dtype)) / (scale * mult.to(dtype))
        return y if bias is None else y + bias
    b = None if bias is None else (bias.float() / scale.float()).to(bias.dtype)
    return F.linear((levels / mult).to(dtype), q.to(dtype), b) * scale


class BitLinearTrain(nn.Linear):
    """BitNet b1.58 training Linear: optional RMSNorm, int8 activations, ternary weights, STE.

    ``lam`` (λ) blends in the quantization: ``x + λ·(quant(x) − x)`` for weights and
    activations. In eval mode at λ = 1 the forward is :func:`bitnet_inference`, the exact
    computation of the converted checkpoint in transformers.
    """

    use_rms_norm: bool
    rms_norm_eps: float
    linear_class: str
    lam: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_rms_norm:
            x = rms_normalize(x, self.rms_norm_eps)
        if not self.training and self.lam >= 1.0:
            return bitnet_inference(x, self.weight, self.bias, self.linear_class)
        xq = ste(x, int8_activation(x), self.lam)
        wq = ste(self.weight, ternary_weight(self.weight), self.lam)
        return F.linear(xq, wq, self.bias)


def as_fake_quant(spec: WeightSpec, act_bits: int | None) -> Callable[[nn.Linear], nn.Module]:
    """A swap factory: the same Linear (same parameters) as a :class:`FakeQuantLinear`."""

    def make(linear: nn.Linear) -> nn.Module:
        mod = _retype(linear, FakeQuantLinear)
        mod.spec, mod.act_bits = spec, act_bits
        return mod

    return make


def as_bitlinear(
    use_rms_norm: bool, rms_norm_eps: float, linear_class: str = "bitlinear"
) -> Callable[[nn.Linear], nn.Module]:
    """A swap factory: the same Linear as a :class:`BitLinearTrain` at λ = 1."""

    def make(linear: nn.Linear) -> nn.Module:
        mod = _retype(linear, BitLinearTrain)
        mod.use_rms_norm, mod.rms_norm_eps, mod.lam = use_rms_norm, rms_norm_eps, 1.0
        mod.linear_class = linear_class
        return mod

    return make


def _retype(linear: nn.Linear, cls: type[nn.Linear]) -> nn.Linear:
    if type(linear) is not nn.Linear:
        raise TypeError(f"expected a plain nn.Linear, got {type(linear).__name__}")
    mod = cls.__new__(cls)
    mod.__dict__ = dict(linear.__dict__)  # shares the Parameter objects and hooks
    return mod


def swap_linears(
    model: nn.Module, names: Iterable[str], make: Callable[[nn.Linear], nn.Module]
) -> list[nn.Module]:
    """Replace each named Linear of ``model`` by ``make(linear)``; returns the new modules."""
    swapped = []
    for name in names:
        mod = make(model.get_submodule(name))
        model.set_submodule(name, mod)
        swapped.append(mod)
    return swapped


def set_lambda(modules: Iterable[nn.Module], lam: float) -> None:
    """Set the quantization strength λ of every :class:`BitLinearTrain` in ``modules``."""
    for m in modules:
        if isinstance(m, BitLinearTrain):
            m.lam = lam


def lambda_schedule(step: int, warmup: int) -> float:
    """λ = min(step / warmup, 1) (the HF 1.58-bit recipe); 1 from the start when warmup is 0."""
    return 1.0 if warmup <= 0 else min(step / warmup, 1.0)
