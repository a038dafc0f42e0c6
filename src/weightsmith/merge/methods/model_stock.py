"""Model Stock (Jang et al. 2024) as mergekit 0.1.5's ``model_stock``.

With task vectors δᵢ = xᵢ − base (k ≥ 2 of them) and c the mean of the pairwise cosines
cos(δᵢ, δⱼ) (each clamped to [−1, 1], norms' product clamped to ≥ 1e-6), the interpolation
ratio is t = k·c / (1 + (k − 1)·c) (t = 0, the base, when |1 + (k − 1)·c| < 1e-6), and
out = t·mean(xᵢ) + (1 − t)·base. ``filter_wise`` takes one cosine per row (last dimension)
instead of one per tensor.

The cosines are whole-tensor statistics: ``prepare`` holds the task vectors (one tensor per
model, in the compute dtype) and reduces them as mergekit does, so a bfloat16 recipe gives
mergekit's bits; ``combine`` is then per entry. With bfloat16 arithmetic on stored
float32/bfloat16 inputs, :meth:`ModelStock.stream_stored` makes the task vectors with a native
kernel straight from the stored tensors, reduces them with the same torch ops, and writes the
output in one native pass (the same bits).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.kernels import merge as native
from weightsmith.kernels import reduce, sphere
from weightsmith.merge.methods import sphere_native
from weightsmith.merge.methods.base import (
    NATIVE_PIECE,
    TORCH_THREADS,
    ChunkSource,
    MergeMethod,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    mergekit_threads,
    whole,
)
from weightsmith.merge.params import BOOL

NORM_FLOOR = 1e-6  # mergekit's clamp of the norms' product, and its singularity threshold


def rows_view(x: torch.Tensor, shape: tuple[int, ...], filter_wise: bool) -> torch.Tensor:
    """The flat tensor as the vectors mergekit reduces: rows of the last dimension, or one."""
    if not filter_wise or len(shape) <= 1:
        return x.reshape(1, -1)
    return x.reshape(-1, shape[-1])


def stock_ratio(offsets: list[torch.Tensor]) -> torch.Tensor:
    """t per row (a column) from the task vectors' rows, in their dtype, as mergekit's ops.
    The offsets are consumed: each one's last product is written over it (the same bits as
    mergekit's out-of-place product, without a whole-tensor temporary for two models)."""
    norms = [torch.norm(d, dim=-1) for d in offsets]
    sums = {}
    for i, a in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            last = j == len(offsets) - 1  # offsets[i] is not needed after this pair
            ab = torch.mul(a, offsets[j], out=a) if last else a * offsets[j]
            sums[i, j] = ab.sum(dim=-1)
    return ratio_from(norms, sums)


def ratio_from(norms: list[torch.Tensor], sums: dict) -> torch.Tensor:
    """t per row (a column) from the rows' norms ‖δᵢ‖ and the pairs' sums Σ δᵢ·δⱼ (``sums[i,
    j]``, i < j), in their dtype, as mergekit's ops."""
    cosines = []
    for i in range(len(norms)):
        for j in range(i + 1, len(norms)):
            product = norms[i] * norms[j]
            cosines.append((sums[i, j] / product.clamp(min=NORM_FLOOR)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(norms)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < NORM_FLOOR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)


@merge_method("model_stock")
class ModelStock(MergeMethod):
    tensor_statistics = True
    stats_ahead = True
    whole_tensor = True
    title = "Model Stock"
    reference = "https://arxiv.org/abs/2403.19522"
    needs_base = True
    min_models = 2
    global_params = (
        Param("filter_wise", False, help="one ratio per row instead of per tensor", kind=BOOL),
    )

    def prepare(self, src: ChunkSource, params: TensorParams) -> tuple[torch.Tensor, int]:
        dt = params.dtype
        fw = bool(params.globals["filter_wise"])
        base = rows_view(whole(src, 0, dt), src.shape, fw)
        offsets = [
            rows_view(whole(src, i, dt), src.shape, fw).sub_(base) for i in range(1, src.num_inputs)
        ]
        with mergekit_threads():  # torch's sums depend on its threads: mergekit's, in a pool too
            return stock_ratio(offsets).reshape(-1), base.shape[-1]  # one t per row, row length

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        dt = params.dtype
        base = chunks[0].to(dt)
        models = [c.to(dt) for c in chunks[1:]]
        t, cols = state
        if t.numel() > 1:  # filter-wise: each entry takes its row's ratio
            t = t[torch.arange(offset, offset + base.numel(), device=base.device) // cols]
        average = sum(models) / len(models)
        return t * average + (1 - t) * base

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic, one ratio per tensor: native task vectors, mergekit's torch
        reductions of them, then one native pass for the output (filter-wise: the torch path);
        the inputs mapped once for both (:func:`sphere_native.stream_mapped`)."""
        if params.dtype != torch.bfloat16 or params.globals["filter_wise"]:
            return None
        if out_dtype not in native.STORAGE or not native.available():
            return None
        native_sums = sphere_native.applies(src, params, out_dtype)
        native_sums = native_sums and sphere_native.native_reductions()

        def prepare(xs: list[torch.Tensor]) -> tuple:
            kept = kept_mean(src) if native_sums else None
            t = (streamed_ratio(src, xs, kept) if native_sums else stored_ratio(src)).reshape(1)
            return t.float(), (1 - t).float(), kept  # mergekit's (1 − t) in bfloat16

        def kernel(state: tuple):
            t_rows, u_rows, kept = state
            if kept is None:
                return lambda xs, out, s: native.stock_mix(xs, 0, t_rows, u_rows, 0, out)
            avg, t, u = kept.rows[0], float(t_rows), float(u_rows)
            return lambda xs, out, s: sphere.stock_out(avg[s : s + out.numel()], xs[0], t, u, out)

        return sphere_native.stream_mapped(src, out_dtype, prepare, kernel, offsets=True)


def kept_mean(src: ChunkSource) -> sphere_native.RowCache | None:
    """A row for the models' mean, which the one-read statistics then keep for the output pass
    (it reads that row and the base instead of every input), where it fits."""
    k = src.num_inputs - 1
    if k > sphere.STOCK_MAX_MODELS or not sphere_native.RowCache.fits(1, src.numel):
        return None
    return sphere_native.RowCache(1, src.numel)


def streamed_ratio(
    src: ChunkSource, xs: list[torch.Tensor], kept: sphere_native.RowCache | None = None
) -> torch.Tensor:
    """:func:`stored_ratio` with torch's norms and sums reproduced natively from the mapped
    stored inputs ``xs``, each fused with the kernel that makes the values it reduces (task
    vectors, their products): no tensor of the input's size is stored. Up to
    ``sphere.STOCK_MAX_MODELS`` models, one kernel makes every task vector and product of a
    span from one read of the inputs (:func:`one_pass_ratio`; ``kept``: it keeps the models'
    mean there)."""
    k = src.num_inputs - 1
    if k <= sphere.STOCK_MAX_MODELS:
        return one_pass_ratio(src, xs, kept)
    vectors = [lambda p, o, i=i: sphere.vector(p, True, i, o) for i in range(1, k + 1)]
    norms = [n.reshape(1) for n in sphere_native.norms(src, xs, vectors)]
    sums = {}
    for i in range(k):
        for j in range(i + 1, k):
            pick = [0, i + 1, j + 1]  # the base and the pair's models

            def prod(p, o, pick=pick):
                return sphere.nus_prod([p[m] for m in pick], True, 1.0, 1.0, o)

            sums[i, j] = sphere_native.tensor_sum(src, xs, prod, TORCH_THREADS).reshape(1)
    return ratio_from(norms, sums)


def one_pass_ratio(
    src: ChunkSource, xs: list[torch.Tensor], kept: sphere_native.RowCache | None = None
) -> torch.Tensor:
    """:func:`streamed_ratio` in one pass: the task vectors' rows each reduced by torch's norm
    (one chain), the pairs' product rows by torch's sum with mergekit's threads (one chain per
    thread's part), fed in order by the kernel that makes them
    (:func:`sphere_native.fused_reductions`); with ``kept``, the models' mean written to its
    row as well."""
    k = src.num_inputs - 1
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    parts = reduce.parts(src.numel, TORCH_THREADS)
    whole = [(0, src.numel)]
    rows = [("norm", whole)] * k + [("casc", parts)] * len(pairs)
    flat = [x[: src.numel] for x in xs]

    def run(feeds: list, scratch: torch.Tensor, step: int) -> None:
        avg = None if kept is None else kept.rows[0]
        sphere_native.refuse_nonfinite(src, sphere.stock_reduce(flat, feeds, scratch, step, avg))

    out = sphere_native.fused_reductions(rows, run)
    norms = [torch.tensor(v[0], dtype=torch.bfloat16).reshape(1) for v in out[:k]]
    sums = {
        pair: torch.tensor(reduce.combine(v, TORCH_THREADS), dtype=torch.bfloat16).reshape(1)
        for pair, v in zip(pairs, out[k:], strict=True)
    }
    return ratio_from(norms, sums)


def stored_ratio(src: ChunkSource) -> torch.Tensor:
    """Model Stock's bfloat16 ratio of one tensor (whole-tensor cosines) from its stored
    inputs: the task vectors δₖ = bf16(xₖ − base) made by a native kernel in parallel pieces
    (the base and one model mapped at a time), then reduced by :func:`stock_ratio` (torch's
    bfloat16 reductions, as mergekit)."""
    deltas = [torch.empty(src.numel, dtype=torch.bfloat16) for _ in range(src.num_inputs - 1)]
    with src.stored(0) as base:
        for k, delta in enumerate(deltas):
            with src.stored(k + 1) as x:
                if min(x.numel(), base.numel()) < src.numel:
                    raise RuntimeError(f"{src.name}: stored inputs are smaller than planned")

                def piece(r: tuple[int, int], x=x, delta=delta) -> list[int]:
                    bad = native.bf16_sub(x[r[0] : r[1]], base[r[0] : r[1]], delta[r[0] : r[1]])
                    if bad is None:
                        raise RuntimeError(f"{src.name}: native kernel refused its inputs")
                    return bad

                for bad_x, bad_base in pmap(piece, sub_ranges(0, src.numel, NATIVE_PIECE)):
                    if bad_base or bad_x:
                        src.fail_nonfinite(0 if bad_base else k + 1)
    with mergekit_threads():
        return stock_ratio([d.reshape(1, -1) for d in deltas])


def model_stock(base: torch.Tensor, models: list[torch.Tensor], *, filter_wise: bool = False):
    """Model Stock of ``models`` around ``base`` (float32 result)."""
    return merge_tensors("model_stock", [base, *models], filter_wise=filter_wise)
