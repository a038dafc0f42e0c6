"""Calibration statistics of a Linear's inputs, registered by name.

A quantization (or pruning) method declares the statistic it needs by name; the layer streamer
(:meth:`~weightsmith.core.calibration.CalibrationLayer.collect`) builds one per Linear with
``STATISTICS[name](in_features)`` and feeds it every calibration batch of the Linear's inputs.
Adding a statistic is one class decorated with ``@input_statistic("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class InputStat(Protocol):
    """Accumulates statistics of one Linear's inputs, batch by batch."""

    n: int  # calibration tokens seen

    def add(self, x: torch.Tensor) -> None:
        """``x``: the Linear's inputs of one batch as ``(tokens, in_features)`` float32."""

    def result(self) -> torch.Tensor:
        """The statistic, handed over (the accumulator may be emptied)."""


STATISTICS: dict[str, Callable[[int], InputStat]] = {}


def input_statistic(name: str) -> Callable[[type], type]:
    """Register a statistic class (constructed as ``cls(in_features)``) under ``name``."""

    def register(cls: type) -> type:
        STATISTICS[name] = cls
        return cls

    return register


@input_statistic("hessian")
class HessianStat:
    """``H = 2/n · Σ x xᵀ`` over the ``n`` calibration tokens (GPTQ's layer-wise Hessian)."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.sum: torch.Tensor | None = None  # allocated on the inputs' device
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.sum is None:
            n = self.in_features
            self.sum = torch.zeros(n, n, dtype=torch.float32, device=x.device)
        self.sum.addmm_(x.t(), x)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.sum is None:
            return torch.zeros(self.in_features, self.in_features)
        return self.sum * (2.0 / max(self.n, 1))

    def take_hessian(self) -> torch.Tensor:
        """:meth:`hessian`, computed in place in the accumulator, which is handed over (the
        stat is empty afterwards): saves one ``(in, in)`` float32 copy per Linear."""
        if self.sum is None:
            return self.hessian()
        h, self.sum = self.sum.mul_(2.0 / max(self.n, 1)), None
        return h

    result = take_hessian


@input_statistic("channel_magnitude")
class ChannelMagnitudeStat:
    """Mean ``|x_j|`` of each input channel over the calibration tokens (AWQ's salience)."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        self.sum += x.abs().sum(0).to("cpu", torch.float64)
        self.n += x.shape[0]

    def result(self) -> torch.Tensor:
        return (self.sum / max(self.n, 1)).float()


@input_statistic("imatrix")
class ImatrixStat:
    """``Σ x_j²`` per input column and the token count: llama.cpp's importance matrix
    (``llama-imatrix`` stores both as ``in_sum2`` / ``counts``; the importance is their ratio)."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        self.sum += x.double().pow(2).sum(0).cpu()
        self.n += x.shape[0]

    def result(self) -> torch.Tensor:
        """Mean ``x_j²`` over the calibration tokens, float32."""
        return (self.sum / max(self.n, 1)).float()


@input_statistic("channel_range")
class ChannelRangeStat:
    """``max_t x_tj - min_t x_tj``: each input channel's dynamic range over the calibration
    tokens (SmoothQuant's activation scale, as llm-compressor's SmoothQuantModifier takes it)."""

    def __init__(self, in_features: int) -> None:
        self.lo = torch.full((in_features,), float("inf"))
        self.hi = torch.full((in_features,), float("-inf"))
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        self.lo = torch.minimum(self.lo, x.amin(0).to("cpu", torch.float32))
        self.hi = torch.maximum(self.hi, x.amax(0).to("cpu", torch.float32))
        self.n += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.hi - self.lo if self.n else torch.zeros_like(self.lo)
