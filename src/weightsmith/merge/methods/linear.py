"""Linear (weighted average) merge, as mergekit's ``linear``: sum(w_i x_i) / sum(w_i)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from weightsmith.errors import ConfigError
from weightsmith.kernels import merge as native
from weightsmith.merge.methods.base import (
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    merge_method,
    stream_native,
)
from weightsmith.merge.params import BOOL


@merge_method("linear")
class Linear(MergeMethod):
    title = "Linear (model soup)"
    reference = "https://arxiv.org/abs/2203.05482"
    global_params = (Param("normalize", True, help="divide by the sum of the weights", kind=BOOL),)
    model_params = (Param("weight", required=True, help="weight of each model"),)

    def validate(self, params: TensorParams) -> None:
        weights = params.model_values("weight")
        if params.globals["normalize"] and sum(weights) == 0:
            raise ConfigError(
                f"tensor {params.name!r}: linear weights sum to 0 and normalize is on"
            )

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        weights = params.model_values("weight")
        if params.narrow:
            return mergekit_linear(chunks, weights, params)
        out = torch.zeros_like(chunks[0])
        for w, x in zip(weights, chunks, strict=True):
            out.add_(x, alpha=w)
        if params.globals["normalize"]:
            out.div_(sum(weights))
        return out

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic: mergekit's ops fused in one native pass over the stored inputs
        (the same bits as :func:`mergekit_linear`), written as ``out_dtype``."""
        if params.dtype != torch.bfloat16 or out_dtype not in native.STORAGE:
            return None
        if not native.available():
            return None
        self.validate(params)
        w = torch.tensor(params.model_values("weight"), dtype=torch.float32)
        div = float(w.sum()) if params.globals["normalize"] else None
        weights = w.tolist()

        def kernel(xs: list[torch.Tensor], out: torch.Tensor):
            return native.narrow_mix(xs, native.LINEAR, weights, div, None, out)

        return stream_native(src, out_dtype, kernel)


def mergekit_linear(
    chunks: list[torch.Tensor], weights: list[float], params: TensorParams
) -> torch.Tensor:
    """mergekit's ops for a narrow compute dtype: inputs rounded to it, float32 sums of
    products (addcmul_: fused multiply-adds on the CPU), a float32 divisor, the result
    rounded to it."""
    dt = params.dtype
    w = torch.tensor(weights, dtype=torch.float32, device=chunks[0].device)
    out = torch.zeros(chunks[0].shape, dtype=torch.float32, device=chunks[0].device)
    for x, wi in zip(chunks, w.unbind(), strict=True):
        out.addcmul_(x.to(dt).float(), wi)
    if params.globals["normalize"]:
        out.div_(w.sum())
    return out.to(dt)


def linear(
    tensors: list[torch.Tensor], weights: list[float], normalize: bool = True
) -> torch.Tensor:
    """Weighted sum of ``tensors`` (divided by the weights' sum when ``normalize``)."""
    from weightsmith.merge.methods.base import merge_tensors

    params = TensorParams("tensor", {"normalize": normalize}, tuple({"weight": w} for w in weights))
    return merge_tensors("linear", tensors, params)
