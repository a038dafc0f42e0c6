"""Quantization methods and output formats: one registered unit each.

A **method** is one file: a frozen, versioned options dataclass (a :class:`MethodConfig`) and
a tensor function ``fn(w, options, stat, *, dtype, zero_min) -> quantized weight`` decorated
with ``@quant_method("name", config=..., statistic=..., formats=...)``. ``statistic`` names the
calibration statistic it needs (``None``: data-free; else a key of
:data:`weightsmith.core.statistics.STATISTICS`, e.g. ``"hessian"``); the layer streamer
computes it and passes it as ``stat``. ``formats[0]`` is its default output format.

A **format** is one class decorated with ``@output_format``: it plans, encodes and *decodes*
the tensors of one quantized Linear and writes config.json's ``quantization_config``
(see :class:`OutputFormat`). The CLI choices, ``compare`` and the docs come from these
registries; see docs/quantize.md, "Adding a quantization method / format".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from weightsmith.compress.levels import QuantizedWeight  # noqa: F401  (re-exported)
from weightsmith.compress.schemes import Scheme, SchemeMap, as_scheme_map
from weightsmith.core.calibration import check_calib_dtype
from weightsmith.errors import ConfigError


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's (and format's) options; recorded in ``weightsmith.json``."""

    version: int = 1

    def describe(self) -> dict:
        """What the run's summary reports about the stored grid (bits, group_size, ...)."""
        return {}

    def validate(self) -> None:
        """Reject values the method cannot use (every float option must be finite)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"--{f.name.replace('_', '-')} must be finite (got {v})")


class CalibrationFailed(ConfigError):
    """A calibrated method cannot quantize one Linear from its statistic (the quantize path
    falls back to RTN when the method's options allow it, else reports ``hint``)."""

    hint = "use more calibration data"


@dataclass(frozen=True)
class GridConfig(MethodConfig):
    """Options of the integer-grid methods (``w ≈ (q - zero) · scale`` per group)."""

    observer: ClassVar[str] = "minmax"  # how qparams are chosen (compressed-tensors' name)
    bits: int = 4
    group_size: int = 128  # -1: one scale per output channel
    symmetric: bool = True

    def validate(self) -> None:
        super().validate()
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"--bits must be between 2 and 8 (got {self.bits})")
        if self.group_size != -1 and self.group_size < 1:
            raise ConfigError(f"--group-size must be -1 or positive (got {self.group_size})")

    def describe(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


@dataclass(frozen=True)
class CalibratedConfig(MethodConfig):
    """Options of every method that runs calibration text through the model."""

    calib: str | None = None  # a .txt/.jsonl file; None: the built-in mix
    calib_samples: int = 128
    seq_len: int = 512
    # MoE: experts routed fewer calibration tokens fall back to RTN (0: never); or feed them all
    min_expert_tokens: int = 32
    calibrate_all_experts: bool = False
    calib_dtype: str = "auto"  # the forwards' dtype (see core.calibration.calibration_dtype)

    def validate(self) -> None:
        super().validate()
        check_calib_dtype(self.calib_dtype)


FormatOptions = MethodConfig  # a format's options are a frozen dataclass of the same shape


@dataclass(frozen=True)
class LinearTarget:
    """A Linear to quantize, as the formats see it."""

    tensor: str  # checkpoint name of the weight, e.g. "model.layers.0.mlp.up_proj.weight"
    module: str  # checkpoint module name (tensor minus ".weight")
    model_module: str  # transformers module name (for config "ignore")
    layer: int | None
    shape: tuple[int, int]  # (out, in)
    dtype: torch.dtype = torch.float32  # as stored
    siblings: frozenset[str] = frozenset()  # its other checkpoint tensors ("bias", ...)
    scheme: Scheme | None = None  # its own grid from the run's scheme map (None: the run's)


class QuantMethodFn(Protocol):
    def __call__(
        self, w: torch.Tensor, cfg: Any, stat: torch.Tensor | None = None, *,
        dtype: torch.dtype | None = None, zero_min: int | None = None,
    ) -> Any: ...  # fmt: skip


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: QuantMethodFn
    config: type[MethodConfig]
    statistic: str | None  # None: data-free
    formats: tuple[str, ...]  # formats[0] is the default
    summary: str
    # fn takes ``scratch=`` (a kernels.quant.Scratch): its levels may live in reused buffers
    scratch: bool = False

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None

    def statistic_for(self, options: MethodConfig) -> str | None:
        """The statistic a run with ``options`` needs: options may choose it themselves
        (``statistic``, e.g. W8A8 only with ``--smoothquant``), else the declared one."""
        return getattr(options, "statistic", self.statistic)


METHODS: dict[str, MethodInfo] = {}
FORMATS: dict[str, OutputFormat] = {}


def quant_method(
    name: str,
    *,
    config: type[MethodConfig],
    statistic: str | None = None,
    formats: tuple[str, ...] = ("compressed-tensors", "gptq"),
    summary: str = "",
    scratch: bool = False,
) -> Callable[[QuantMethodFn], QuantMethodFn]:
    """Register a weight quantization method under ``name`` (see the module docstring)."""
    if statistic is not None and not issubclass(config, CalibratedConfig):
        raise TypeError(f"{name}: a calibrated method's config must extend CalibratedConfig")

    def register(fn: QuantMethodFn) -> QuantMethodFn:
        doc = summary or (fn.__doc__ or "").split("\n")[0]
        METHODS[name] = MethodInfo(name, fn, config, statistic, formats, doc, scratch)
        return fn

    return register


class OutputFormat(Protocol):
    """One on-disk layout of quantized Linears. ``target`` is the Linear being written (its
    ``module`` name, ``shape`` ``(out, in)``, stored ``dtype`` and the ``siblings`` it has in
    the checkpoint, e.g. ``{"bias"}``)."""

    name: str
    summary: str
    quant_method: str  # config.json's quantization_config["quant_method"]
    options: type[MethodConfig] | None  # the format's own options (None: none)
    planned: bool  # output shapes known before quantizing (else the writer spills)

    def check(self, cfg: QuantConfig) -> None:
        """Reject configs this format cannot store."""

    def plan(self, target: LinearTarget, cfg: QuantConfig) -> list:
        """TensorSpecs this format writes for a quantized Linear (no data read)."""

    def encode(self, target: LinearTarget, qw: Any, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        """The stored tensors of a quantized Linear."""

    def rewrites(self, target: LinearTarget, cfg: QuantConfig) -> tuple[str, ...]:
        """Other checkpoint tensors of the Linear that change with its quantization."""

    def rewrite(
        self, name: str, t: torch.Tensor, target: LinearTarget, qw: Any, cfg: QuantConfig
    ) -> torch.Tensor:
        """The stored value of a tensor from :meth:`rewrites` (``qw``: its Linear's weight)."""

    def quantization_config(self, cfg: QuantConfig, ignored: list[str], dtype) -> dict:
        """The ``quantization_config`` block of config.json (a format with
        ``per_module_schemes = True`` also takes ``targets=``: the quantized Linears, each with
        its ``scheme``, when the run has a scheme map)."""

    def stored_linears(self, names: Iterable[str], qc: dict) -> dict[str, tuple[str, ...]]:
        """Dense weight name -> the stored tensors that hold it, in a checkpoint written with
        ``quantization_config`` ``qc`` (``{}`` when ``qc`` is a variant it cannot decode)."""

    def decode(self, qc: dict, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dequantized float32 ``(out, in)`` weight of Linear ``module`` from its stored
        tensors (full names, as :meth:`stored_linears` lists them)."""


class FormatDefaults:
    """Defaults of the optional parts of :class:`OutputFormat` (a format may subclass it)."""

    options: type[MethodConfig] | None = None
    planned = True
    scale_dtype: torch.dtype | None = None  # quantize with scales as stored (None: model dtype)

    def check(self, cfg: QuantConfig) -> None:
        return None

    def zero_min(self, options: MethodConfig) -> int | None:
        """The lowest zero point this format can store for ``options`` (None: any level)."""
        return None

    def rewrites(self, target: LinearTarget, cfg: QuantConfig) -> tuple[str, ...]:
        return ()

    def rewrite(
        self, name: str, t: torch.Tensor, target: LinearTarget, qw: Any, cfg: QuantConfig
    ) -> torch.Tensor:
        raise NotImplementedError(name)


def output_format(cls: type) -> type:
    """Register an output format class (instantiated once) under its ``name``."""
    FORMATS[cls.name] = cls()
    return cls


def format_reading(quant_method: str | None, variant: str | None = None) -> OutputFormat | None:
    """The registered format that writes config.json's ``quant_method`` (None: none); among
    several (compressed-tensors), the one whose ``variant`` is quantization_config's ``format``."""
    found = [f for f in FORMATS.values() if f.quant_method == quant_method]
    exact = [f for f in found if getattr(f, "variant", None) == variant]
    return (exact or found or [None])[0]


@dataclass(frozen=True, init=False)
class QuantConfig:
    """One quantization run: the method with its own options, the output format with its own,
    and the Linears kept. Built from flat keywords, each routed to the options class that has
    it: ``QuantConfig("gptq", bits=3, damp=0.02)`` holds ``GPTQConfig(bits=3, damp=0.02)``.
    An option that neither the method nor the format has is a :class:`ConfigError`;
    ``format=None`` is the method's default format, and a format the method cannot write is an
    error. Values are checked by :meth:`validate` (``quantize_checkpoint`` calls it first).
    Reading ``cfg.bits`` reads the method's (or format's) option. ``schemes``: per-module
    grids (mixed precision, :mod:`weightsmith.compress.schemes`), any spelling that
    :func:`~weightsmith.compress.schemes.as_scheme_map` takes; Linears that no pattern
    matches use ``options``."""

    method: str
    format: str
    options: MethodConfig
    format_options: MethodConfig | None
    ignore: tuple[str, ...]
    schemes: SchemeMap

    def __init__(
        self, method: str = "rtn", format: str | None = None, ignore: Iterable[str] = (), *,
        options: MethodConfig | None = None, format_options: MethodConfig | None = None,
        schemes: Any = (), **flat: Any,
    ) -> None:  # fmt: skip
        info = _method(method)
        fmt = format or info.formats[0]
        if fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
        if fmt not in info.formats:
            raise ConfigError(
                f"--method {method} writes --format {' or '.join(info.formats)}, not {fmt}"
            )
        fo = FORMATS[fmt].options
        mine = {f.name for f in dataclasses.fields(info.config)} - {"version"}
        theirs = {f.name for f in dataclasses.fields(fo)} - {"version"} if fo else set()
        for k in flat:
            if k not in mine | theirs:
                flag = _FLAGS.get(k, f"--{k.replace('_', '-')}")
                raise ConfigError(f"{flag} does not apply to --method {method} --format {fmt}")
        if (options is not None and mine & set(flat)) or (format_options and theirs & set(flat)):
            raise ConfigError("give a method's (or format's) options as an object or as keywords")
        options = options or info.config(**{k: v for k, v in flat.items() if k in mine})
        if fo is not None and format_options is None:
            format_options = fo(**{k: v for k, v in flat.items() if k in theirs})
        for k, v in (("method", method), ("format", fmt), ("options", options),
                     ("format_options", format_options), ("ignore", tuple(ignore)),
                     ("schemes", as_scheme_map(schemes))):  # fmt: skip
            object.__setattr__(self, k, v)

    def with_scheme(self, scheme: Scheme) -> QuantConfig:
        """This run's config for one Linear quantized with ``scheme`` (no scheme map left)."""
        return QuantConfig(self.method, self.format, self.ignore,
                           options=scheme.apply(self.options), format_options=self.format_options)  # fmt: skip

    def validate(self) -> None:
        if not isinstance(self.options, METHODS[self.method].config):
            raise ConfigError(
                f"--method {self.method} takes {METHODS[self.method].config.__name__}"
            )
        self.options.validate()
        if self.schemes:
            self._check_schemes()
        if self.format_options is not None:
            self.format_options.validate()
        FORMATS[self.format].check(self)

    def _check_schemes(self) -> None:
        if not isinstance(self.options, GridConfig):
            raise ConfigError(
                f"--scheme-map applies to the integer-grid methods "
                f"({', '.join(m for m, i in METHODS.items() if issubclass(i.config, GridConfig))}),"
                f" not --method {self.method}"
            )
        if not getattr(FORMATS[self.format], "per_module_schemes", False):
            raise ConfigError(
                f"--scheme-map needs a format that stores a grid per module (compressed-tensors); "
                f"--format {self.format} stores one"
            )
        for _, scheme in self.schemes:
            if scheme is not None:
                scheme.apply(self.options).validate()

    def __getattr__(self, name: str) -> Any:
        for part in ("options", "format_options"):
            holder = self.__dict__.get(part)
            if holder is not None and hasattr(holder, name) and name != "version":
                return getattr(holder, name)
        raise AttributeError(f"--method {self.__dict__.get('method')} has no option {name!r}")

    def record(self) -> dict:
        """What ``weightsmith.json`` records: method, format and each one's options."""
        fo = self.format_options
        return {
            "method": self.method, "format": self.format, "ignore": list(self.ignore),
            **({"schemes": {p: str(s or "keep") for p, s in self.schemes}} if self.schemes else {}),
            self.method: dataclasses.asdict(self.options),
            **({self.format: dataclasses.asdict(fo)} if fo is not None else {}),
        }  # fmt: skip


_FLAGS = {"symmetric": "--sym/--asym"}  # options whose CLI flag is not --<name>


def _method(name: str) -> MethodInfo:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]
