"""compressed-tensors ``float-quantized`` (FP8) and ``int-quantized`` (int8) formats: per Linear
``weight`` stored as ``float8_e4m3fn`` / int8 in its own shape and ``weight_scale`` in the
weight's dtype, ``(out, 1)`` per channel or ``(⌈out/128⌉, ⌈in/128⌉)`` per block; config.json's
``quantization_config`` as llm-compressor writes it. vLLM serves both; transformers loads them
with the ``compressed-tensors`` package (decompressed to the model dtype on CPU)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from weightsmith.compress.ct_config import ct_quantization_config, single_group
from weightsmith.compress.registry import FormatDefaults, LinearTarget, QuantConfig, output_format
from weightsmith.compress.scaled import (
    FP8,
    SCALE_DTYPES,
    ScaledWeight,
    dequantize_scaled,
    scale_shape,
)
from weightsmith.errors import ConfigError
from weightsmith.io.writer import TensorSpec


class _ScaledFormat(FormatDefaults):
    """The shared layout; subclasses set ``name``, ``kind`` and the stored ``level_dtype``."""

    name: str
    kind: str
    level_dtype: torch.dtype
    quant_method = "compressed-tensors"

    @property
    def variant(self) -> str:  # config.json's quantization_config["format"]
        return self.name

    def check(self, cfg: QuantConfig) -> None:
        if getattr(cfg.options, "kind", None) != self.kind:
            raise ConfigError(f"--format {self.name} stores {self.kind} levels; "
                              f"--method {cfg.method} does not make them")  # fmt: skip

    def plan(self, target: LinearTarget, cfg: QuantConfig) -> list[TensorSpec]:
        m, block = target.module, cfg.options.block
        if target.dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"{m}: weight is {str(target.dtype).removeprefix('torch.')}, not a 16/32/64-bit "
                f"float; --method {cfg.method} quantizes float weights (--ignore {m})"
            )
        if block is not None and target.shape[1] % block[1]:
            raise ConfigError(
                f"{m}: in_features {target.shape[1]} is not a multiple of the {block[1]}-column "
                f"block (vLLM's block kernels need it; llm-compressor 0.14 fails on it); use "
                f"--scheme dynamic or --ignore {m}"
            )
        return [
            TensorSpec(f"{m}.weight", self.level_dtype, target.shape),
            TensorSpec(f"{m}.weight_scale", target.dtype, scale_shape(target.shape, block)),
        ]

    def encode(self, target: LinearTarget, qw: ScaledWeight, cfg: QuantConfig) -> dict:
        return {
            f"{target.module}.weight": qw.q.to(self.level_dtype),
            f"{target.module}.weight_scale": qw.scale.to(target.dtype),
        }

    def quantization_config(self, cfg: QuantConfig, ignored: list[str], dtype) -> dict:
        group, scheme = cfg.options.ct_group()
        return ct_quantization_config(group, scheme, ignored)

    def stored_linears(self, names: Iterable[str], qc: dict) -> dict[str, tuple[str, ...]]:
        if qc.get("format") != self.variant or single_group(qc) is None:
            return {}
        names = set(names)
        return {
            f"{n[: -len('_scale')]}": (n[: -len("_scale")], n)
            for n in sorted(names)
            if n.endswith(".weight_scale") and n[: -len("_scale")] in names
        }

    def decode(self, qc: dict, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = single_group(qc)["weights"]
        block = weights.get("block_structure") if weights.get("strategy") == "block" else None
        q, scale = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"]
        return dequantize_scaled(q, scale, tuple(block) if block else None)


@output_format
class FloatQuantizedFormat(_ScaledFormat):
    """compressed-tensors ``float-quantized``: FP8-E4M3 weights + scales."""

    name = "float-quantized"
    kind = "fp8"
    level_dtype = FP8
    summary = (
        "compressed-tensors float-quantized FP8-E4M3 (vLLM, transformers + compressed-tensors)"
    )


@output_format
class IntQuantizedFormat(_ScaledFormat):
    """compressed-tensors ``int-quantized``: int8 weights + scales (W8A8)."""

    name = "int-quantized"
    kind = "int8"
    level_dtype = torch.int8
    summary = "compressed-tensors int-quantized int8 W8A8 (vLLM, transformers + compressed-tensors)"
