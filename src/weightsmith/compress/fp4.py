"""FP4-E2M1 weight-only formats, data-free (``--method nvfp4`` / ``--method mxfp4``), with the
arithmetic of compressed-tensors 0.19 as llm-compressor 0.14's ``model_free_ptq`` runs it
(presets ``NVFP4A16`` / ``MXFP4A16``), so weights and scales are bit-identical to its output:

- E2M1 levels ``0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6`` (round to nearest, ties to even), two per
  byte (low nibble first), a nibble is ``sign << 3 | index`` (a negative value rounded to 0
  keeps its sign bit, as compressed-tensors' packer does);
- **NVFP4**: groups of 16 input columns, ``group_scale = fp8_e4m3(global · max|w_g| / 6)``
  (stored as ``float8_e4m3fn``; 0 becomes 0.125) and one float32 ``global = 448 · 6 / max|W|``
  computed in the weight's dtype and **shared by fused Linears** (q/k/v of one attention, gate/up
  of one MLP: vLLM fuses them, so llm-compressor gives them one global scale); levels are
  ``e2m1(w / (group_scale / global))``;
- **MXFP4**: groups of 32, the scale a power of two stored as its biased exponent (E8M0, uint8):
  ``e = 127 + floor(log2(p2(max|w_g|))) - 2`` with ``p2`` compressed-tensors' power-of-two
  rounding (up only from a mantissa of .75); levels ``e2m1(w / 2^(e - 127))`` in the weight's
  dtype.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from weightsmith.compress.ct_config import ct_args, ct_quantization_config, ct_scheme, single_group
from weightsmith.compress.registry import (
    FormatDefaults,
    LinearTarget,
    MethodConfig,
    QuantConfig,
    output_format,
    quant_method,
)
from weightsmith.compress.scaled import FP8, FP8_MAX
from weightsmith.errors import ConfigError
from weightsmith.io.writer import TensorSpec

FP4_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4_MAX = 6.0
# Linears vLLM fuses (llm-compressor's model-free fused sets): they share NVFP4's global scale
FUSED = (re.compile(r"^(.*(?:attn|attention))\.[qkv]_proj$"), re.compile(r"^(.*mlp)\.(?:gate|up)_proj$"))  # fmt: skip


# E2M1 rounding boundaries: |x| at or above boundary i rounds to level i + 1. compressed-tensors
# rounds ties to even: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4,
# so the boundaries at 0.25, 1.25, 2.5 and 5 are just above them.
_TIES_DOWN = torch.tensor([True, False, True, False, True, False, True])
_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
BOUNDARIES = torch.where(_TIES_DOWN, torch.nextafter(_MIDPOINTS, torch.tensor(7.0)), _MIDPOINTS)


def e2m1_index(x: torch.Tensor) -> torch.Tensor:
    """Index of ``|x|``'s nearest E2M1 magnitude (ties to even) in :data:`E2M1`."""
    return torch.bucketize(x.abs().float(), BOUNDARIES, right=True)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """``x`` (already within ±6) rounded to the nearest E2M1 value, ties to even, keeping the
    sign of ``x`` on values rounded to zero."""
    return E2M1[e2m1_index(x)].to(x.dtype) * torch.sign(x)


def pack_e2m1(v: torch.Tensor) -> torch.Tensor:
    """E2M1 values ``(rows, cols)`` -> uint8 ``(rows, cols / 2)``, low nibble = even column."""
    codes = e2m1_index(v).to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)
    codes = codes.reshape(-1, 2)
    return (codes[:, 0] | (codes[:, 1] << 4)).reshape(v.shape[0], v.shape[1] // 2)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_e2m1`: float32 ``(rows, 2 · bytes)``."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    values = E2M1[(codes & 0x07).long()]
    return torch.where((codes & 0x08).bool(), -values, values)


def nvfp4_global_scale(absmax: torch.Tensor) -> torch.Tensor:
    """float32 ``(1,)``: ``448 · 6 / absmax`` in ``absmax``'s dtype (1 where that overflows)."""
    a = torch.clamp(absmax.reshape(1), min=torch.finfo(absmax.dtype).tiny)
    g = torch.nan_to_num((FP8_MAX * FP4_MAX) / a, nan=1.0, posinf=1.0, neginf=1.0)
    return g.to(torch.float32)


def _power_of_two(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``round_to_power_2`` of non-negative ``x`` (bit masks)."""
    bits = {torch.bfloat16: (torch.int16, 7, 8), torch.float16: (torch.int16, 10, 5),
            torch.float32: (torch.int32, 23, 8)}  # fmt: skip
    int_dtype, mantissa, exponent = bits[x.dtype]
    u = x.view(int_dtype).to(torch.int64) & ((1 << (8 * x.element_size())) - 1)
    mask = ((1 << (exponent + 1)) - 1) << mantissa
    out = (u + (1 << (mantissa - 2))) & mask
    out = torch.where(
        out >= 1 << (8 * x.element_size() - 1), out - (1 << (8 * x.element_size())), out
    )
    return out.to(int_dtype).view(x.dtype)


@dataclass
class FP4Weight:
    """Packed E2M1 levels ``(out, in / 2)`` uint8 and the group scales as stored (NVFP4:
    ``float8_e4m3fn`` + float32 ``global_scale``; MXFP4: uint8 exponents)."""

    packed: torch.Tensor
    scale: torch.Tensor
    group_size: int
    global_scale: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        return fp4_dequantize(self.packed, self.scale, self.group_size, self.global_scale)


def fp4_dequantize(packed, scale, group_size: int, global_scale=None) -> torch.Tensor:
    """float32 ``(out, in)`` weight from stored tensors (NVFP4 when ``global_scale`` is set)."""
    if global_scale is not None:
        s = scale.float() / global_scale.float()
    else:
        s = torch.pow(2.0, scale.to(torch.int32).float() - 127)
    return unpack_e2m1(packed) * s.repeat_interleave(group_size, dim=1)


def nvfp4_quantize_weight(w: torch.Tensor, absmax: torch.Tensor) -> FP4Weight:
    """NVFP4 of ``w`` (its own dtype) with the global scale of ``absmax`` (its fused set's)."""
    gs = nvfp4_global_scale(absmax.to(w.dtype))
    g = w.unflatten(-1, (-1, 16))
    lo = torch.clamp(g.amin(-1), max=0)
    hi = torch.clamp(g.amax(-1), min=0)
    half = torch.tensor(2 * FP4_MAX, dtype=w.dtype) / 2
    scale = gs * (torch.maximum(lo.abs(), hi.abs()) / half)  # float32
    scale = scale.clamp(-FP8_MAX, FP8_MAX).to(FP8).to(torch.float32)
    scale = torch.where(scale == 0, torch.tensor(0.125), scale).to(w.dtype)  # as the parameter
    x = (g / (scale.unsqueeze(-1) / gs)).clamp(-FP4_MAX, FP4_MAX)
    levels = round_e2m1(x).flatten(-2).to(w.dtype)
    return FP4Weight(pack_e2m1(levels), scale.to(FP8), 16, gs)


def mxfp4_quantize_weight(w: torch.Tensor) -> FP4Weight:
    """MXFP4 of ``w`` in its own dtype (groups of 32, E8M0 scales)."""
    g = w.unflatten(-1, (-1, 32))
    lo = torch.clamp(g.amin(-1), max=0)
    hi = torch.clamp(g.amax(-1), min=0)
    exp = 127 + torch.floor(torch.log2(_power_of_two(torch.maximum(lo.abs(), hi.abs())))) - 2
    exp = torch.round(exp.clamp(0, 255)).to(torch.uint8).to(w.dtype)
    scale = (2.0 ** (exp.to(torch.int32) - 127).to(torch.float)).to(w.dtype)
    scale = torch.where(scale == 0, torch.tensor(1.0, dtype=w.dtype), scale)
    levels = round_e2m1((g / scale.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX)).flatten(-2)
    stored = (127 + torch.floor(torch.log2(scale)).to(torch.int32)).to(torch.uint8)
    return FP4Weight(pack_e2m1(levels.to(w.dtype)), stored, 32)


@dataclass(frozen=True)
class NVFP4Config(MethodConfig):
    """``--method nvfp4``: FP4-E2M1 weights, FP8 scales per 16 columns + a global scale."""

    kind = "nvfp4"
    fp4_group = 16  # (not "group_size": that is --group-size, which these methods do not take)

    def describe(self) -> dict:
        return {"bits": 4, "group_size": 16, "symmetric": True}

    def ct_group(self) -> tuple[str, dict]:
        return "NVFP4A16", ct_scheme("nvfp4-pack-quantized", ct_args(
            4, "float", "tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn"))  # fmt: skip

    def weight_stats(self, job: Any) -> dict[str, torch.Tensor]:
        """max|W| of every target's fused set (one extra read of each weight)."""
        sets: dict[str, list[LinearTarget]] = {}
        for t in job.targets:
            m = next((p.match(t.model_module) for p in FUSED if p.match(t.model_module)), None)
            sets.setdefault(f"{m.group(1)}*" if m else t.module, []).append(t)
        out = {}
        for members in sets.values():
            absmax = torch.stack([job.read(t.tensor).abs().max() for t in members]).max()
            out.update({t.module: absmax for t in members})
        return out


@dataclass(frozen=True)
class MXFP4Config(MethodConfig):
    """``--method mxfp4``: FP4-E2M1 weights, power-of-two (E8M0) scales per 32 columns."""

    kind = "mxfp4"
    fp4_group = 32

    def describe(self) -> dict:
        return {"bits": 4, "group_size": 32, "symmetric": True}

    def ct_group(self) -> tuple[str, dict]:
        return "MXFP4A16", ct_scheme("mxfp4-pack-quantized", ct_args(
            4, "float", "group", group_size=32, scale_dtype="torch.uint8"))  # fmt: skip


@quant_method("nvfp4", config=NVFP4Config, formats=("nvfp4-pack-quantized",),
              summary="NVFP4: FP4-E2M1 weights, FP8 scales per 16 + global scale (no calibration)")  # fmt: skip
def nvfp4_quantize(w, cfg: NVFP4Config, stat=None, *, dtype=None, zero_min=None) -> FP4Weight:
    """NVFP4 of ``w``; ``stat`` is max|W| over its fused set (default: ``w``'s own)."""
    return nvfp4_quantize_weight(w, w.abs().max() if stat is None else stat)


@quant_method("mxfp4", config=MXFP4Config, formats=("mxfp4-pack-quantized",),
              summary="MXFP4: FP4-E2M1 weights, E8M0 scales per 32 (no calibration)")  # fmt: skip
def mxfp4_quantize(w, cfg: MXFP4Config, stat=None, *, dtype=None, zero_min=None) -> FP4Weight:
    """MXFP4 of ``w`` in its own dtype."""
    return mxfp4_quantize_weight(w)


class _FP4Format(FormatDefaults):
    """``weight_packed`` uint8 ``(out, in/2)``, ``weight_scale`` ``(out, in/g)`` (and NVFP4's
    float32 ``weight_global_scale`` ``(1,)``), as compressed-tensors writes them."""

    name: str
    kind: str
    scale_dtype_stored: torch.dtype
    quant_method = "compressed-tensors"

    @property
    def variant(self) -> str:
        return self.name

    def check(self, cfg: QuantConfig) -> None:
        if getattr(cfg.options, "kind", None) != self.kind:
            raise ConfigError(f"--format {self.name} is written by --method {self.kind} only")

    def plan(self, target: LinearTarget, cfg: QuantConfig) -> list[TensorSpec]:
        (out_f, in_f), m, g = target.shape, target.module, cfg.options.fp4_group
        if target.dtype not in FP4_INPUT_DTYPES:
            raise ConfigError(f"{m}: weight is {str(target.dtype).removeprefix('torch.')}, not "
                              f"a 16/32-bit float (--ignore {m})")  # fmt: skip
        if in_f % g:
            raise ConfigError(f"{m}: in_features {in_f} is not a multiple of {self.kind}'s "
                              f"group of {g}; --ignore {m}")  # fmt: skip
        specs = [TensorSpec(f"{m}.weight_packed", torch.uint8, (out_f, in_f // 2)),
                 TensorSpec(f"{m}.weight_scale", self.scale_dtype_stored, (out_f, in_f // g))]  # fmt: skip
        if self.kind == "nvfp4":
            specs.append(TensorSpec(f"{m}.weight_global_scale", torch.float32, (1,)))
        return specs

    def encode(self, target: LinearTarget, qw: FP4Weight, cfg: QuantConfig) -> dict:
        m = target.module
        out = {f"{m}.weight_packed": qw.packed, f"{m}.weight_scale": qw.scale}
        if qw.global_scale is not None:
            out[f"{m}.weight_global_scale"] = qw.global_scale
        return out

    def quantization_config(self, cfg: QuantConfig, ignored: list[str], dtype) -> dict:
        group, scheme = cfg.options.ct_group()
        return ct_quantization_config(group, scheme, ignored)

    def stored_linears(self, names: Iterable[str], qc: dict) -> dict[str, tuple[str, ...]]:
        if qc.get("format") != self.variant or single_group(qc) is None:
            return {}
        names, out = set(names), {}
        for n in sorted(names):
            if n.endswith(".weight_packed"):
                m = n[: -len(".weight_packed")]
                parts = [
                    f"{m}.{s}" for s in ("weight_packed", "weight_scale", "weight_global_scale")
                ]
                out[f"{m}.weight"] = tuple(p for p in parts if p in names)
        return out

    def decode(self, qc: dict, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        g = int(single_group(qc)["weights"]["group_size"])
        return fp4_dequantize(tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_scale"],
                              g, tensors.get(f"{module}.weight_global_scale"))  # fmt: skip


@output_format
class NVFP4Format(_FP4Format):
    name = "nvfp4-pack-quantized"
    kind = "nvfp4"
    scale_dtype_stored = FP8
    summary = "compressed-tensors nvfp4-pack-quantized (NVFP4A16; vLLM, transformers + c-t)"


@output_format
class MXFP4Format(_FP4Format):
    name = "mxfp4-pack-quantized"
    kind = "mxfp4"
    scale_dtype_stored = torch.uint8
    summary = "compressed-tensors mxfp4-pack-quantized (MXFP4A16; vLLM, transformers + c-t)"
