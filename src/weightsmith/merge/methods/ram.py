"""Reinforced Agent Merging as mergekit 0.1.5's ``ram``.

Per entry, with task vectors δᵢ = xᵢ − base: the models whose |δᵢ| > ``epsilon`` contribute;
an entry changed by one model takes that model's δ, an entry changed by several takes their
mean, an entry changed by none stays the base's. Entry by entry: no whole-tensor statistics.
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


@merge_method("ram")
class Ram(MergeMethod):
    title = "Reinforced Agent Merging"
    reference = "https://arxiv.org/abs/2601.13572"
    needs_base = True
    global_params = (
        Param("epsilon", 1e-5, help="a task-vector entry counts when |δ| > epsilon", low=0.0),
    )

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        dt = params.dtype
        base = chunks[0].to(dt)
        deltas = torch.stack([c.to(dt) - base for c in chunks[1:]])
        changed = deltas.abs() > float(params.globals["epsilon"])
        counts = changed.sum(dim=0, keepdim=True)
        kept = deltas * changed
        mixed = (kept * (counts == 1) + kept * (counts > 1) / counts.clamp(min=1)).sum(dim=0)
        return base + mixed

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic: mergekit's ops in one native pass over the stored inputs (the
        bits of :meth:`combine`), written as ``out_dtype``."""
        if not native_ram_usable(src, params, out_dtype):
            return None
        eps = float(params.globals["epsilon"])

        def kernel(xs: list[torch.Tensor], out: torch.Tensor):
            res = native.ram(xs, eps, native.RAM, out=out)
            return None if res is None else res[:2]

        return stream_native(src, out_dtype, kernel)


def native_ram_usable(src: ChunkSource, params: TensorParams, out_dtype: torch.dtype) -> bool:
    """Whether the native RAM kernels take this job: bfloat16 arithmetic, at most
    ``RAM_MAX_MODELS`` models, a float32/bfloat16 output."""
    return (
        params.dtype == torch.bfloat16
        and out_dtype in native.STORAGE
        and src.num_inputs - 1 <= native.RAM_MAX_MODELS
        and native.available()
    )


def ram(base: torch.Tensor, models: list[torch.Tensor], *, epsilon: float = 1e-5):
    """RAM merge of ``models`` onto ``base`` (float32 result)."""
    return merge_tensors("ram", [base, *models], epsilon=epsilon)
