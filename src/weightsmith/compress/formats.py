"""Output formats for quantized Linears: tensor names, layouts and the config.json block."""

from __future__ import annotations

import math

import torch

from weightsmith.compress.packing import pack_int32, pack_rows_gptq
from weightsmith.compress.registry import QuantConfig, QuantizedWeight, output_format
from weightsmith.errors import ConfigError
from weightsmith.io.writer import TensorSpec


@output_format
class CompressedTensorsFormat:
    """compressed-tensors ``pack-quantized``: what vLLM and transformers (with the
    ``compressed-tensors`` package) load. Per Linear: ``weight_packed`` int32 ``(out, ⌈in·b/32⌉)``,
    ``weight_scale`` ``(out, n_groups)``, ``weight_zero_point`` int32 packed along dim 0
    (asymmetric only) and ``weight_shape`` int64 ``[out, in]``."""

    name = "compressed-tensors"
    summary = "pack-quantized int2-8 (vLLM, transformers + compressed-tensors)"

    def check(self, cfg: QuantConfig) -> None:
        return None

    def plan(self, module: str, shape, dtype, cfg: QuantConfig) -> list[TensorSpec]:
        out_f, in_f = shape
        groups = 1 if cfg.group_size == -1 else in_f // cfg.group_size
        specs = [
            TensorSpec(
                f"{module}.weight_packed", torch.int32, (out_f, math.ceil(in_f * cfg.bits / 32))
            ),
            TensorSpec(f"{module}.weight_scale", dtype, (out_f, groups)),
            TensorSpec(f"{module}.weight_shape", torch.int64, (2,)),
        ]
        if not cfg.symmetric:
            specs.append(
                TensorSpec(
                    f"{module}.weight_zero_point",
                    torch.int32,
                    (math.ceil(out_f * cfg.bits / 32), groups),
                )
            )
        return specs

    def encode(
        self, module: str, qw: QuantizedWeight, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        out = {
            f"{module}.weight_packed": pack_int32(qw.q, qw.bits, dim=1),
            f"{module}.weight_scale": qw.scale.to(dtype),
            f"{module}.weight_shape": torch.tensor(list(qw.q.shape), dtype=torch.int64),
        }
        if not qw.symmetric:
            out[f"{module}.weight_zero_point"] = pack_int32(qw.zero, qw.bits, dim=0)
        return out

    def quantization_config(self, cfg: QuantConfig, ignored: list[str]) -> dict:
        weights = {
            "num_bits": cfg.bits,
            "type": "int",
            "symmetric": cfg.symmetric,
            "group_size": None if cfg.group_size == -1 else cfg.group_size,
            "strategy": "channel" if cfg.group_size == -1 else "group",
            "dynamic": False,
            "observer": "minmax",
        }
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "output_activations": None,
                }
            },
            "ignore": ignored,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }


@output_format
class GPTQFormat:
    """The AutoGPTQ/GPTQModel ``gptq`` (v1) layout: ``qweight`` int32 ``(in·b/32, out)``,
    ``qzeros`` int32 ``(n_groups, out·b/32)`` storing ``zero - 1`` (the v1 convention),
    ``scales`` float16 ``(n_groups, out)``, ``g_idx`` int32 ``(in,)``; bits 2, 4 or 8."""

    name = "gptq"
    scale_dtype = torch.float16  # quantize with the scales as stored
    summary = "AutoGPTQ/GPTQModel v1 qweight/qzeros/scales/g_idx (bits 2/4/8)"

    def check(self, cfg: QuantConfig) -> None:
        if cfg.bits not in (2, 4, 8):
            raise ConfigError(f"--format gptq stores 2, 4 or 8 bits, not {cfg.bits}")

    def plan(self, module: str, shape, dtype, cfg: QuantConfig) -> list[TensorSpec]:
        out_f, in_f = shape
        groups = 1 if cfg.group_size == -1 else in_f // cfg.group_size
        per = 32 // cfg.bits
        if in_f % per or out_f % per:
            raise ConfigError(
                f"{module}: --format gptq needs in/out features divisible by {per} "
                f"(got {in_f}, {out_f}); --ignore it or use compressed-tensors"
            )
        return [
            TensorSpec(f"{module}.qweight", torch.int32, (in_f // per, out_f)),
            TensorSpec(f"{module}.qzeros", torch.int32, (groups, out_f // per)),
            TensorSpec(f"{module}.scales", torch.float16, (groups, out_f)),
            TensorSpec(f"{module}.g_idx", torch.int32, (in_f,)),
        ]

    def encode(
        self, module: str, qw: QuantizedWeight, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        offset = 1 << (qw.bits - 1)
        in_f = qw.q.shape[1]
        u = (qw.q.to(torch.int64) + offset).t()  # (in, out), unsigned
        zeros_u = (qw.zero.to(torch.int64) + offset).t()  # (groups, out)
        g_idx = qw.g_idx if qw.g_idx is not None else torch.arange(in_f) // qw.group_size
        return {
            f"{module}.qweight": pack_rows_gptq(u, qw.bits, dim=0),
            f"{module}.qzeros": pack_rows_gptq(
                (zeros_u - 1) & ((1 << qw.bits) - 1), qw.bits, dim=1
            ),
            f"{module}.scales": qw.scale.t().to(torch.float16).contiguous(),
            f"{module}.g_idx": g_idx.to(torch.int32),
        }

    def quantization_config(self, cfg: QuantConfig, ignored: list[str]) -> dict:
        return {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": cfg.bits,
            "group_size": cfg.group_size,
            "sym": cfg.symmetric,
            "desc_act": False,  # act-order uses static groups: g_idx is i // group_size
            "static_groups": cfg.act_order,
            "true_sequential": True,
            "damp_percent": cfg.damp,
            "modules_in_block_to_quantize": None,
        }
