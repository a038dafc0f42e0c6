"""transformers' ``bitnet`` format (``quantization_config.quant_method: "bitnet"``), offline mode.

Per quantized Linear ``(out, in)``, as ``transformers.integrations.bitnet`` loads it:

- ``weight``: uint8 ``(out/4, in)``, four 2-bit values ``q + 1`` per byte packed along the
  OUTPUT dim: the rows are split into 4 blocks of ``out/4`` and row ``r`` of block ``i`` sits
  at bits ``2i..2i+1`` of packed row ``r`` (``pack_weights``/``unpack_weights``);
- ``weight_scale``: ``(1,)`` in the model dtype. ``bitlinear`` (``BitLinear``) computes
  ``y / (m · weight_scale)``, so it stores ``1/γ``; ``autobitlinear`` (``AutoBitLinear``)
  computes ``(x̂ Wᵀ + b) · weight_scale``, so it stores ``γ`` and the bias as ``b / γ``;
- ``rms_norm.weight`` ``(in,)``: ones (``use_rms_norm`` only; passed through when the
  checkpoint already has it), so transformers reports no missing keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from weightsmith.compress.registry import (
    FormatDefaults,
    LinearTarget,
    MethodConfig,
    QuantConfig,
    QuantizedWeight,
    output_format,
)
from weightsmith.errors import ConfigError
from weightsmith.io.writer import TensorSpec

VALUES_PER_BYTE = 4
LINEAR_CLASSES = ("bitlinear", "autobitlinear")


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """Ternary levels ``(out, …)`` -> uint8 ``(out/4, …)`` in transformers' ``pack_weights``
    layout (``out`` must be divisible by 4)."""
    out_f = q.shape[0]
    if out_f % VALUES_PER_BYTE:
        raise ValueError(f"out_features {out_f} is not divisible by {VALUES_PER_BYTE}")
    if q.numel() and (int(q.min()) < -1 or int(q.max()) > 1):
        raise ValueError("ternary levels must be in {-1, 0, 1}")
    u = (q.to(torch.int16) + 1).to(torch.uint8)
    blocks = u.reshape(VALUES_PER_BYTE, out_f // VALUES_PER_BYTE, *q.shape[1:])
    packed = torch.zeros_like(blocks[0])
    for i in range(VALUES_PER_BYTE):
        packed |= blocks[i] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 levels ``(4 · rows, …)``."""
    parts = [(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)]
    return torch.cat(parts, 0).to(torch.int8) - 1


def stored_scale(
    gamma: torch.Tensor | float, linear_class: str, dtype: torch.dtype
) -> torch.Tensor:
    """``weight_scale`` ``(1,)`` for ``linear_class``: ``1/γ`` (bitlinear) or ``γ`` (autobitlinear)."""
    g = torch.as_tensor(gamma, dtype=torch.float32).reshape(1)
    return (1.0 / g if linear_class == "bitlinear" else g).to(dtype)


def effective_gamma(weight_scale: torch.Tensor, linear_class: str) -> torch.Tensor:
    """The ``γ`` a stored ``weight_scale`` multiplies the ternary product by (float32)."""
    s = weight_scale.float().reshape(())
    return 1.0 / s if linear_class == "bitlinear" else s


@dataclass(frozen=True)
class BitNetOptions(MethodConfig):
    """``--format bitnet``'s options: how transformers will run the ternary Linears."""

    linear_class: str = "bitlinear"  # or "autobitlinear": decides the weight_scale convention
    use_rms_norm: bool = False  # a weightless RMSNorm before each BitLinear's int8 activations
    rms_norm_eps: float = 1e-6

    def validate(self) -> None:
        super().validate()
        if self.linear_class not in LINEAR_CLASSES:
            raise ConfigError(
                f"--linear-class must be one of {', '.join(LINEAR_CLASSES)} "
                f"(got {self.linear_class!r})"
            )
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"--rms-norm-eps must be positive (got {self.rms_norm_eps})")


@output_format
class BitNetFormat(FormatDefaults):
    """transformers ``bitnet`` (offline): uint8 2-bit ternary weights packed along the output
    dim, a per-tensor ``weight_scale`` whose convention follows ``linear_class``."""

    name = "bitnet"
    quant_method = "bitnet"
    options = BitNetOptions
    summary = "transformers BitNet b1.58 (quant_method bitnet): 2-bit packed ternary, CPU/GPU"

    def plan(self, target: LinearTarget, cfg: QuantConfig) -> list[TensorSpec]:
        (out_f, in_f), m = target.shape, target.module
        if out_f % VALUES_PER_BYTE:
            raise ConfigError(
                f"{m}: out_features {out_f} is not divisible by 4, which the bitnet format "
                f"packs along; --ignore it"
            )
        if "rms_norm.weight" in target.siblings and not cfg.format_options.use_rms_norm:
            raise ConfigError(
                f"{m}.rms_norm.weight: the checkpoint has BitLinear RMSNorm weights; "
                "pass --use-rms-norm"
            )
        specs = [
            TensorSpec(f"{m}.weight", torch.uint8, (out_f // VALUES_PER_BYTE, in_f)),
            TensorSpec(f"{m}.weight_scale", target.dtype, (1,)),
        ]
        if self._new_norm(target, cfg):
            specs.append(TensorSpec(f"{m}.rms_norm.weight", target.dtype, (in_f,)))
        return specs

    @staticmethod
    def _new_norm(target: LinearTarget, cfg: QuantConfig) -> bool:
        """Write a ones RMSNorm weight (unless the checkpoint brings its own)."""
        return cfg.format_options.use_rms_norm and "rms_norm.weight" not in target.siblings

    def encode(
        self, target: LinearTarget, qw: QuantizedWeight, cfg: QuantConfig
    ) -> dict[str, torch.Tensor]:
        """The stored tensors of one ternary Linear (``qw`` from ``ternary_quantize``)."""
        m, lc = target.module, cfg.format_options.linear_class
        out = {
            f"{m}.weight": pack_ternary(qw.q),
            f"{m}.weight_scale": stored_scale(qw.scale, lc, target.dtype),
        }
        if self._new_norm(target, cfg):
            out[f"{m}.rms_norm.weight"] = torch.ones(qw.q.shape[1], dtype=target.dtype)
        return out

    def rewrites(self, target: LinearTarget, cfg: QuantConfig) -> tuple[str, ...]:
        """AutoBitLinear scales the bias with the output, so it stores ``b / γ``."""
        auto = cfg.format_options.linear_class == "autobitlinear"
        return (f"{target.module}.bias",) if auto and "bias" in target.siblings else ()

    def rewrite(
        self, name: str, t: torch.Tensor, target: LinearTarget, qw: QuantizedWeight,
        cfg: QuantConfig,
    ) -> torch.Tensor:  # fmt: skip
        scale = stored_scale(qw.scale, cfg.format_options.linear_class, target.dtype)
        return (t.float() / scale.float()).to(t.dtype)

    def quantization_config(self, cfg: QuantConfig, ignored: list[str], dtype) -> dict:
        fo = cfg.format_options
        return {
            "quant_method": "bitnet",
            "linear_class": fo.linear_class,
            "quantization_mode": "offline",
            "modules_to_not_convert": ignored,
            "use_rms_norm": fo.use_rms_norm,
            "rms_norm_eps": fo.rms_norm_eps,
        }

    def stored_linears(self, names: Iterable[str], qc: dict) -> dict[str, tuple[str, ...]]:
        if qc.get("quantization_mode", "offline") != "offline":
            return {}
        have = set(names)
        return {
            f"{n[: -len('_scale')]}": (n[: -len("_scale")], n)
            for n in sorted(have)
            if n.endswith(".weight_scale") and n[: -len("_scale")] in have
        }

    def decode(self, qc: dict, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        q = unpack_ternary(tensors[f"{module}.weight"]).float()
        gamma = effective_gamma(tensors[f"{module}.weight_scale"], qc.get("linear_class", ""))
        return q * gamma
