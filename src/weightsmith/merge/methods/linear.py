"""Linear (weighted average) merge, as mergekit's ``linear``: sum(w_i x_i) / sum(w_i)."""

from __future__ import annotations

from typing import Any

import torch

from weightsmith.errors import ConfigError
from weightsmith.merge.methods.base import MergeMethod, Param, TensorParams, merge_method
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


def mergekit_linear(
    chunks: list[torch.Tensor], weights: list[float], params: TensorParams
) -> torch.Tensor:
    """mergekit's ops for a narrow compute dtype: inputs rounded to it, float32 sums of
    products (no fused multiply-add), a float32 divisor, the result rounded to it."""
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
