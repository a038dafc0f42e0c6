"""Reinforced Agent Merging Plus, tensor-local, as mergekit 0.1.5's ``ramplus_tl``.

RAM (ram.py) per entry, with task vectors δₖ = xₖ − base and "changed" meaning |δₖ| > ε: an
entry changed by one model takes that model's δ, one changed by several their mean. RAM+ scales
each model's unique entries by λₖ = 1 + r · clamp(ρₖ, 0, α), where ρₖ is, over the whole
tensor, model k's count of changed entries that another model also changed divided by its count
of changed entries no other model changed (clamped below at ε): a model whose changes mostly
overlap others' gets its few unique ones amplified. ρ is a whole-tensor statistic (one pass of
counts before the output is streamed); the rest is per entry, with mergekit's operations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.kernels import merge as native
from weightsmith.merge.methods.base import (
    NATIVE_PIECE,
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    stream_native,
)
from weightsmith.merge.methods.ram import native_ram_usable


def _masks(chunks: list[torch.Tensor], dt: torch.dtype, epsilon: float):
    """mergekit's ``_prepare_ram_vectors`` on one chunk: δ, changed, counts, overlap, unique."""
    base = chunks[0].to(dt)
    deltas = torch.stack([c.to(dt) - base for c in chunks[1:]])
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return base, deltas, changed, counts, counts > 1, counts == 1


@merge_method("ramplus_tl")
class RamPlusTensorLocal(MergeMethod):
    title = "Reinforced Agent Merging Plus (tensor-local)"
    reference = "https://arxiv.org/abs/2601.13572"
    needs_base = True
    tensor_statistics = True
    global_params = (
        Param("r", 0.1, help="strength of the boost of each model's unique entries"),
        Param("alpha", 0.2, help="upper clamp of the shared/unique ratio rho"),
        Param("epsilon", 1e-5, help="a task-vector entry counts when |δ| > epsilon", low=0.0),
    )

    def prepare(self, src: ChunkSource, params: TensorParams) -> torch.Tensor:
        """λₖ for every model from the whole tensor's shared and unique change counts."""
        eps = float(params.globals["epsilon"])
        shared = unique = None
        for chunks in src.chunks():
            _, _, changed, _, overlap, single = _masks(chunks, params.dtype, eps)
            s, u = (changed & overlap).sum(dim=1), (changed & single).sum(dim=1)
            shared, unique = (s, u) if shared is None else (shared + s, unique + u)
        if shared is None:  # an empty tensor
            shared = unique = torch.zeros(src.num_inputs - 1, dtype=torch.int64)
        return self.lambdas(torch.stack([shared, unique], dim=1), params)

    def lambdas(self, counts: torch.Tensor, params: TensorParams) -> torch.Tensor:
        """λₖ (float32, as mergekit computes it) from each model's (shared, unique) counts."""
        eps = float(params.globals["epsilon"])
        shared, unique = counts[:, 0].to(torch.int64), counts[:, 1].to(torch.int64)
        rho = shared / unique.clamp(min=eps)
        return 1 + float(params.globals["r"]) * rho.clamp(min=0, max=float(params.globals["alpha"]))

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        eps = float(params.globals["epsilon"])
        base, deltas, changed, counts, overlap, single = _masks(chunks, params.dtype, eps)
        kept = deltas * changed
        lam = state.to(kept.device).unsqueeze(-1)
        mixed = ((kept * single * lam) + (kept * overlap / counts.clamp(min=1))).sum(dim=0)
        return base + mixed

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic: the counts in one native pass over the stored inputs, then
        mergekit's ops in another (the bits of :meth:`prepare` and :meth:`combine`)."""
        if not native_ram_usable(src, params, out_dtype):
            return None
        eps = float(params.globals["epsilon"])
        lam = self.lambdas(stored_counts(src, eps), params).tolist()

        def kernel(xs: list[torch.Tensor], out: torch.Tensor):
            res = native.ram(xs, eps, native.RAMPLUS, lam, out)
            return None if res is None else res[:2]

        return stream_native(src, out_dtype, kernel)


def stored_counts(src: ChunkSource, eps: float) -> torch.Tensor:
    """(shared, unique) changed-entry counts per model (int64, one row each) of one tensor's
    stored inputs, summed over native pieces run in parallel."""
    counts = torch.zeros(src.num_inputs - 1, 2, dtype=torch.int64)
    with contextlib.ExitStack() as stack:
        stored = [stack.enter_context(src.stored(i)) for i in range(src.num_inputs)]
        if any(x.numel() < src.numel for x in stored):
            raise RuntimeError(f"{src.name}: stored inputs are smaller than the planned size")

        def piece(r: tuple[int, int]):
            res = native.ram([x[r[0] : r[1]] for x in stored], eps, native.RAMPLUS_COUNTS)
            if res is None:
                raise RuntimeError(f"{src.name}: native kernel refused its inputs")
            return res

        for _, bad, c in pmap(piece, sub_ranges(0, src.numel, NATIVE_PIECE)):
            for i, n in enumerate(bad):
                if n:
                    src.fail_nonfinite(i)
            counts += torch.tensor(c, dtype=torch.int64).view(-1, 2)
    return counts


def ramplus_tl(
    base: torch.Tensor,
    models: list[torch.Tensor],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM+ (tensor-local) merge of ``models`` onto ``base`` (float32 result)."""
    return merge_tensors("ramplus_tl", [base, *models], r=r, alpha=alpha, epsilon=epsilon)
