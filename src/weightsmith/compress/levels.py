"""Integer levels and their qparams: the quantized weight every integer-grid method returns,
and the one dequantization all of them (and the formats' decoders) share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def level_range(bits: int) -> tuple[int, int]:
    """Signed integer levels of a ``bits``-wide quantizer: ``(-2^(b-1), 2^(b-1) - 1)``."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(q - zero) * scale`` with each input column's group from ``g_idx`` (or ``i // g``).
    In natural group order the qparams are broadcast over each group instead of gathered per
    column (the same float operations on the same values)."""
    cols = q.shape[1]
    if (
        g_idx is None
        and q.dim() == 2
        and scale.shape == zero.shape == (q.shape[0], cols // group_size)
        and cols % group_size == 0
    ):
        rows, n = scale.shape
        qg = q.float().view(rows, n, group_size)
        return ((qg - zero.float().view(rows, n, 1)) * scale.float().view(rows, n, 1)).view(
            rows, cols
        )
    if g_idx is None:
        g_idx = torch.arange(cols) // group_size
    g = g_idx.long()
    s = scale[:, g].float()
    z = zero[:, g].float()
    return (q.float() - z) * s


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
        return dequantize(self.q, self.scale, self.zero, self.group_size, self.g_idx)
