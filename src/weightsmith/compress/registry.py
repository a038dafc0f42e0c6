"""Quantization configs and the registries that methods and output formats join by decorator.

Adding a method is one file: decorate ``fn(w, cfg, hessian) -> QuantizedWeight`` with
``@quant_method("name")``. Adding a format is one class decorated with ``@output_format``.
The CLI choices and the docs table come from these registries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from weightsmith.errors import ConfigError


@dataclass(frozen=True)
class QuantConfig:
    """Options of one quantization run, recorded in the output's ``weightsmith.json``."""

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128  # -1: one scale per output channel
    symmetric: bool = True
    format: str = "compressed-tensors"
    ignore: tuple[str, ...] = ()  # always in addition to lm_head
    # calibration (gptq)
    calib: str | None = None
    calib_samples: int = 128
    seq_len: int = 512
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    allow_rtn_fallback: bool = False
    # nf4 (bitsandbytes)
    double_quant: bool = False
    # ternary (transformers' bitnet format; see compress/bitnet_format.py)
    linear_class: str = "bitlinear"  # or "autobitlinear": decides the weight_scale convention
    use_rms_norm: bool = False  # a weightless RMSNorm before each BitLinear's int8 activations
    rms_norm_eps: float = 1e-6
    version: int = 1

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r} (known: {', '.join(FORMATS)})")
        if self.method not in ("nf4", "ternary") and not 2 <= self.bits <= 8:
            raise ConfigError(f"--bits must be between 2 and 8 (got {self.bits})")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"--group-size must be -1 or positive (got {self.group_size})")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"--damp must be in [0, 1) (got {self.damp})")
        if (self.method == "nf4") != (self.format == "bnb"):
            raise ConfigError("--method nf4 goes with --format bnb (and only it)")
        if (self.method == "ternary") != (self.format == "bitnet"):
            raise ConfigError("--method ternary goes with --format bitnet (and only it)")
        if self.format != "bitnet" and (self.linear_class != "bitlinear" or self.use_rms_norm):
            raise ConfigError("--linear-class and --use-rms-norm apply to --format bitnet only")
        FORMATS[self.format].check(self)


@dataclass
class QuantizedWeight:
    """A quantized ``(out, in)`` weight: integer levels and the qparams to map them back.

    Levels are signed, ``[-2^(b-1), 2^(b-1) - 1]``, as compressed-tensors stores them;
    ``w ≈ (q - zero) * scale`` with ``scale``/``zero`` of shape ``(out, n_groups)`` and input
    column ``i`` in group ``g_idx[i]`` (``i // group_size`` unless act-order reorders them).
    """

    q: torch.Tensor  # int8 (out, in)
    scale: torch.Tensor  # (out, n_groups), the output dtype
    zero: torch.Tensor  # int8 (out, n_groups); all 0 when symmetric
    bits: int
    group_size: int  # == in_features for per-channel
    symmetric: bool
    g_idx: torch.Tensor | None = None  # int32 (in,)
    info: dict = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        from weightsmith.compress.rtn import dequantize

        return dequantize(self.q, self.scale, self.zero, self.group_size, self.g_idx)


class QuantMethod(Protocol):
    def __call__(
        self, w: torch.Tensor, cfg: QuantConfig, hessian: torch.Tensor | None = None
    ) -> QuantizedWeight: ...


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: QuantMethod
    needs_calibration: bool
    summary: str


METHODS: dict[str, MethodInfo] = {}
FORMATS: dict[str, OutputFormat] = {}


def quant_method(
    name: str, *, needs_calibration: bool = False, summary: str = ""
) -> Callable[[QuantMethod], QuantMethod]:
    """Register a weight quantization method under ``name``."""

    def register(fn: QuantMethod) -> QuantMethod:
        METHODS[name] = MethodInfo(
            name, fn, needs_calibration, summary or (fn.__doc__ or "").split("\n")[0]
        )
        return fn

    return register


class OutputFormat(Protocol):
    name: str
    summary: str

    def check(self, cfg: QuantConfig) -> None:
        """Reject configs this format cannot store."""

    def plan(
        self, module: str, shape: tuple[int, int], dtype: torch.dtype, cfg: QuantConfig
    ) -> list:
        """TensorSpecs this format writes for a quantized Linear ``module`` (no data)."""

    def encode(
        self, module: str, qw: QuantizedWeight, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The tensors stored for a quantized Linear."""

    def quantization_config(self, cfg: QuantConfig, ignored: list[str]) -> dict:
        """The ``quantization_config`` block of config.json."""


def output_format(cls: type) -> type:
    """Register an output format class (instantiated once) under its ``name``."""
    FORMATS[cls.name] = cls()
    return cls
