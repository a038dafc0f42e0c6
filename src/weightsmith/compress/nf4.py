"""NF4 through bitsandbytes' ``quantize_4bit`` (blocksize 64, optional double quant), saved
exactly as transformers saves a ``BitsAndBytesConfig(load_in_4bit=True)`` model (``--format
bnb``): the packed ``uint8`` weight ``(numel/2, 1)`` under ``<module>.weight`` plus the
quant-state tensors ``<module>.weight.absmax``, ``.quant_map``, (``.nested_absmax``,
``.nested_quant_map``) and ``.quant_state.bitsandbytes__nf4`` (its JSON). No NF4 code of our own.
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
    output_format,
    quant_method,
)

BLOCKSIZE = 64


def nf4_quantize_tensor(w: torch.Tensor, *, double_quant: bool = False) -> dict[str, torch.Tensor]:
    """bitsandbytes NF4 of one weight: ``{"weight": packed uint8, "weight.absmax": ..., ...}``."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        w.contiguous(), blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=double_quant,
        quant_storage=torch.uint8,
    )  # fmt: skip
    out = {"weight": packed}
    out.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out


def nf4_dequantize(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`nf4_quantize_tensor` (bitsandbytes' own dequantization)."""
    import bitsandbytes.functional as bnbf

    qs = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
    state = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
    return bnbf.dequantize_4bit(tensors["weight"], state)


@dataclass
class NF4Weight:
    """One NF4-quantized weight: bitsandbytes' tensors, keyed as :func:`nf4_quantize_tensor`."""

    tensors: dict[str, torch.Tensor]
    info: dict

    def dequantize(self) -> torch.Tensor:
        return nf4_dequantize(self.tensors).float()


@dataclass(frozen=True)
class NF4Config(MethodConfig):
    """``--method nf4``: 4-bit NormalFloat in blocks of 64 along the flattened weight."""

    double_quant: bool = False  # also quantize the absmax constants (8-bit, blocks of 256)

    def describe(self) -> dict:
        return {"bits": 4, "group_size": BLOCKSIZE, "symmetric": True}


@quant_method("nf4", config=NF4Config, formats=("bnb",),
              summary="NF4 4-bit (bitsandbytes quantize_4bit, blocksize 64)")  # fmt: skip
def nf4_quantize(
    w: torch.Tensor, cfg: NF4Config, stat=None, *, dtype=None, zero_min=None
) -> NF4Weight:
    """bitsandbytes NF4 of ``w`` in its stored dtype."""
    return NF4Weight(nf4_quantize_tensor(w, double_quant=cfg.double_quant), {})


@output_format
class BnbFormat(FormatDefaults):
    """bitsandbytes 4-bit (NF4), as transformers saves ``BitsAndBytesConfig(load_in_4bit=True)``.
    The quant-state JSON's length is only known after quantizing: not planned (spilled)."""

    name = "bnb"
    quant_method = "bitsandbytes"
    planned = False
    summary = "bitsandbytes NF4, reloads with transformers + bitsandbytes (CPU or GPU)"

    def plan(self, target: LinearTarget, cfg: QuantConfig) -> list:
        return []

    def encode(self, target: LinearTarget, qw: NF4Weight, cfg: QuantConfig) -> dict:
        return {f"{target.module}.{k}": v for k, v in qw.tensors.items()}

    def quantization_config(self, cfg: QuantConfig, ignored: list[str], dtype) -> dict:
        return {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": cfg.options.double_quant,
            "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": ignored,
            "llm_int8_threshold": 6.0,
        }

    def stored_linears(self, names: Iterable[str], qc: dict) -> dict[str, tuple[str, ...]]:
        if not qc.get("load_in_4bit"):
            return {}
        names = sorted(names)
        have = set(names)
        return {
            n: (n, *(p for p in names if p.startswith(f"{n}.")))
            for n in names
            if n.endswith(".weight") and f"{n}.absmax" in have
        }

    def decode(self, qc: dict, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        w = f"{module}.weight"
        return nf4_dequantize({"weight" + k[len(w) :]: v for k, v in tensors.items()}).float()
