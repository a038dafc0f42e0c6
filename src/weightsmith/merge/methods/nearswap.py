"""NearSwap as mergekit 0.1.5's ``nearswap``: take the other model's value where it is near.

With base ``a`` and the other model ``b``, each entry moves from ``a`` towards ``b`` by
``w = clamp(t / max(|a − b|, 1e-6), 0, 1)``: entries closer than ``t`` become ``b``, distant
ones stay near ``a``. Exactly two inputs (the base and one model); ``t`` has no default.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from weightsmith.kernels import merge as native
from weightsmith.merge.methods.base import (
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    stream_native,
)

CLAMP = 1e-6  # mergekit's floor of |a − b|


@merge_method("nearswap")
class NearSwap(MergeMethod):
    title = "NearSwap"
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    needs_base = True
    exact_inputs = 2
    global_params = (
        Param("t", required=True, help="distance below which the other model's value is taken"),
    )

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        a, b = (c.to(params.dtype) for c in chunks)  # mergekit's ops in the compute dtype
        t = float(params.globals["t"])
        # the same operations as mergekit, so results agree to the bit
        absdiff = torch.abs(a - b)
        weight = (t / absdiff.clamp(min=CLAMP)).clamp(min=0, max=1)
        return weight * b + (1 - weight) * a

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic: mergekit's ops in one native pass over the stored inputs (the
        bits of :meth:`combine`), written as ``out_dtype``."""
        if params.dtype != torch.bfloat16 or out_dtype not in native.STORAGE:
            return None
        if not native.available():
            return None
        t = float(params.globals["t"])

        def kernel(xs: list[torch.Tensor], out: torch.Tensor):
            return native.nearswap(xs[0], xs[1], t, CLAMP, out)

        return stream_native(src, out_dtype, kernel)


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap ``other`` into ``base`` with distance ``t`` (float32 result)."""
    return merge_tensors("nearswap", [base, other], t=t)
