"""Output formats for integer-grid quantized Linears: compressed-tensors and GPTQ v1."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from weightsmith.compress.ct_config import ct_group_for
from weightsmith.compress.packing import pack_int32, pack_rows_gptq, unpack_int32, unpack_rows_gptq
from weightsmith.compress.registry import (
    FormatDefaults,
    GridConfig,
    LinearTarget,
    QuantConfig,
    QuantizedWeight,
    output_format,
)
from weightsmith.compress.rtn import dequantize
from weightsmith.compress.schemes import Scheme
from weightsmith.errors import ConfigError
from weightsmith.io.writer import TensorSpec


def _groups(cfg: QuantConfig, in_f: int) -> int:
    return 1 if cfg.options.group_size == -1 else in_f // cfg.options.group_size


def _check_grid(cfg: QuantConfig, fmt: str) -> None:
    if not isinstance(cfg.options, GridConfig):
        raise ConfigError(f"--format {fmt} stores integer levels; --method {cfg.method} has none")


def _ct_group(scheme: Scheme, options: GridConfig, targets: list[str]) -> dict:
    """One pack-quantized config group: ``scheme``'s integer weights for ``targets``."""
    weights = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "group_size": None if scheme.group_size == -1 else scheme.group_size,
        "strategy": "channel" if scheme.group_size == -1 else "group",
        "dynamic": False,
        "observer": options.observer,
    }
    return {"targets": targets, "weights": weights, "input_activations": None,
            "output_activations": None}  # fmt: skip


@output_format
class CompressedTensorsFormat(FormatDefaults):
    """compressed-tensors ``pack-quantized``: what vLLM and transformers (with the
    ``compressed-tensors`` package) load. Per Linear: ``weight_packed`` int32 ``(out, ⌈in·b/32⌉)``,
    ``weight_scale`` ``(out, n_groups)``, ``weight_zero_point`` int32 packed along dim 0
    (asymmetric only) and ``weight_shape`` int64 ``[out, in]``."""

    name = "compressed-tensors"
    quant_method = "compressed-tensors"
    variant = "pack-quantized"  # quantization_config["format"]
    summary = "pack-quantized int2-8 (vLLM, transformers + compressed-tensors)"
    per_module_schemes = True  # a config group per --scheme-map scheme

    def check(self, cfg: QuantConfig) -> None:
        _check_grid(cfg, self.name)

    def plan(self, target: LinearTarget, cfg: QuantConfig) -> list[TensorSpec]:
        (out_f, in_f), m, bits = target.shape, target.module, cfg.options.bits
        groups = _groups(cfg, in_f)
        specs = [
            TensorSpec(f"{m}.weight_packed", torch.int32, (out_f, math.ceil(in_f * bits / 32))),
            TensorSpec(f"{m}.weight_scale", target.dtype, (out_f, groups)),
            TensorSpec(f"{m}.weight_shape", torch.int64, (2,)),
        ]
        if not cfg.options.symmetric:
            zp = (math.ceil(out_f * bits / 32), groups)
            specs.append(TensorSpec(f"{m}.weight_zero_point", torch.int32, zp))
        return specs

    def encode(
        self, target: LinearTarget, qw: QuantizedWeight, cfg: QuantConfig
    ) -> dict[str, torch.Tensor]:
        m = target.module
        out = {
            f"{m}.weight_packed": pack_int32(qw.q, qw.bits, dim=1),
            f"{m}.weight_scale": qw.scale.to(target.dtype),
            f"{m}.weight_shape": torch.tensor(list(qw.q.shape), dtype=torch.int64),
        }
        if not qw.symmetric:
            out[f"{m}.weight_zero_point"] = pack_int32(qw.zero, qw.bits, dim=0)
        return out

    def quantization_config(
        self, cfg: QuantConfig, ignored: list[str], dtype, targets: list | None = None
    ) -> dict:
        """One config group targeting every Linear; with a scheme map (``targets``: the
        quantized Linears, each with its ``scheme``), a group per other scheme listing its
        Linears by exact name before it (compressed-tensors and vLLM match exact names before
        class names; listed first, no target goes unmatched in compressed-tensors' pass)."""
        default = Scheme.of(cfg.options)
        by_scheme: dict[Scheme, list[str]] = {}
        for t in targets or ():
            by_scheme.setdefault(t.scheme or default, []).append(t.model_module)
        groups = {}
        for scheme, names in by_scheme.items():
            if scheme != default:
                groups[f"group_{len(groups)}"] = _ct_group(scheme, cfg.options, names)
        if default in by_scheme or not targets:
            groups[f"group_{len(groups)}"] = _ct_group(default, cfg.options, ["Linear"])
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": ignored,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
        }

    def stored_linears(self, names: Iterable[str], qc: dict) -> dict[str, tuple[str, ...]]:
        groups = list((qc.get("config_groups") or {}).values())
        if qc.get("format") != "pack-quantized" or not groups:
            return {}
        names = set(names)
        out = {}
        for n in sorted(names):
            if n.endswith(".weight_packed"):
                m = n[: -len(".weight_packed")]
                parts = [f"{m}.{s}" for s in ("weight_packed", "weight_scale", "weight_shape",
                                              "weight_zero_point")]  # fmt: skip
                out[f"{m}.weight"] = tuple(p for p in parts if p in names)
        return out

    def decode(self, qc: dict, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        group = ct_group_for(qc, module)
        if group is None:
            raise ConfigError(f"{module}: no config group of quantization_config targets it")
        bits = int(group["weights"]["num_bits"])
        rows, cols = (int(x) for x in tensors[f"{module}.weight_shape"])
        packed = tensors[f"{module}.weight_packed"]
        if packed.shape[1] != math.ceil(cols * bits / 32):  # e.g. a group whose names differ
            raise ConfigError(f"{module}: weight_packed {list(packed.shape)} does not hold "
                              f"{cols} {bits}-bit levels per row (its config group)")  # fmt: skip
        q = unpack_int32(packed, bits, cols, dim=1)
        scale = tensors[f"{module}.weight_scale"]  # (out, n_groups)
        zp = tensors.get(f"{module}.weight_zero_point")
        zero = (
            unpack_int32(zp, bits, rows, dim=0)
            if zp is not None
            else torch.zeros_like(scale, dtype=torch.int8)
        )
        return dequantize(q, scale, zero, cols // scale.shape[1])


@output_format
class GPTQFormat(FormatDefaults):
    """The AutoGPTQ/GPTQModel ``gptq`` (v1) layout: ``qweight`` int32 ``(in·b/32, out)``,
    ``qzeros`` int32 ``(n_groups, out·b/32)`` storing ``zero - 1`` (the v1 convention),
    ``scales`` float16 ``(n_groups, out)``, ``g_idx`` int32 ``(in,)``; bits 2, 4 or 8."""

    name = "gptq"
    quant_method = "gptq"
    scale_dtype = torch.float16  # quantize with the scales as stored
    summary = "AutoGPTQ/GPTQModel v1 qweight/qzeros/scales/g_idx (bits 2/4/8)"

    def check(self, cfg: QuantConfig) -> None:
        _check_grid(cfg, self.name)
        if cfg.options.bits not in (2, 4, 8):
            raise ConfigError(f"--format gptq stores 2, 4 or 8 bits, not {cfg.options.bits}")

    def zero_min(self, options: GridConfig) -> int | None:
        """v1 stores ``zero - 1`` unsigned, so the lowest level cannot be a zero point."""
        return None if options.symmetric else -(1 << (options.bits - 1)) + 1

    def plan(self, target: LinearTarget, cfg: QuantConfig) -> list[TensorSpec]:
        (out_f, in_f), m = target.shape, target.module
        groups = _groups(cfg, in_f)
        per = 32 // cfg.options.bits
        if in_f % per or out_f % per:
            raise ConfigError(
                f"{m}: --format gptq needs in/out features divisible by {per} "
                f"(got {in_f}, {out_f}); --ignore it or use compressed-tensors"
            )
        return [
            TensorSpec(f"{m}.qweight", torch.int32, (in_f // per, out_f)),
            TensorSpec(f"{m}.qzeros", torch.int32, (groups, out_f // per)),
            TensorSpec(f"{m}.scales", torch.float16, (groups, out_f)),
            TensorSpec(f"{m}.g_idx", torch.int32, (in_f,)),
        ]

    def encode(
        self, target: LinearTarget, qw: QuantizedWeight, cfg: QuantConfig
    ) -> dict[str, torch.Tensor]:
        m, offset, in_f = target.module, 1 << (qw.bits - 1), qw.q.shape[1]
        u = (qw.q.to(torch.int64) + offset).t()  # (in, out), unsigned
        zeros_u = (qw.zero.to(torch.int64) + offset).t()  # (groups, out)
        g_idx = qw.g_idx if qw.g_idx is not None else torch.arange(in_f) // qw.group_size
        return {
            f"{m}.qweight": pack_rows_gptq(u, qw.bits, dim=0),
            f"{m}.qzeros": pack_rows_gptq((zeros_u - 1) & ((1 << qw.bits) - 1), qw.bits, dim=1),
            f"{m}.scales": qw.scale.t().to(torch.float16).contiguous(),
            f"{m}.g_idx": g_idx.to(torch.int32),
        }

    def quantization_config(self, cfg: QuantConfig, ignored: list[str], dtype) -> dict:
        o = cfg.options
        return {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": o.bits,
            "group_size": o.group_size,
            "sym": o.symmetric,
            "desc_act": False,  # act-order uses static groups: g_idx is i // group_size
            "static_groups": getattr(o, "act_order", False),
            "true_sequential": True,
            "damp_percent": getattr(o, "damp", 0.01),
            "modules_in_block_to_quantize": None,
        }

    def stored_linears(self, names: Iterable[str], qc: dict) -> dict[str, tuple[str, ...]]:
        if qc.get("checkpoint_format", "gptq") != "gptq" or qc.get("desc_act"):
            return {}  # gptq v2 zero points / reordered columns: not what weightsmith writes
        names = set(names)
        out = {}
        for n in sorted(names):
            if n.endswith(".qweight"):
                m = n[: -len(".qweight")]
                parts = tuple(f"{m}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx"))
                if all(p in names for p in parts):
                    out[f"{m}.weight"] = parts
        return out

    def decode(self, qc: dict, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        bits = int(qc["bits"])
        offset = 1 << (bits - 1)
        q = unpack_rows_gptq(tensors[f"{module}.qweight"], bits, dim=0).t() - offset
        # qzeros stores zero - 1 (the v1 convention), packed along the output dim
        zeros_u = unpack_rows_gptq(tensors[f"{module}.qzeros"], bits, dim=1) + 1
        scale = tensors[f"{module}.scales"].t()  # (out, n_groups)
        return dequantize(q, scale, (zeros_u - offset).t(), 0, tensors[f"{module}.g_idx"])
