"""Arcee Fusion as mergekit 0.1.5's ``arcee_fusion``: keep only the most important changes.

For a base B and one model X: importance = |X − B| · KL(softmax(X) ‖ softmax(B)), the KL taken
per row (last dimension, ε = 1e-8 added to both distributions); the threshold is
median + 1.5·(q₃ − q₁) of the importances (quantiles at index ⌊q·(n−1)⌋ of the sorted values);
out = B + (X − B)·[importance ≥ threshold].

Tensors of more than 1M entries take their quantiles from 1M entries drawn with replacement,
as mergekit does; mergekit's draw is unseeded, weightsmith's is seeded (by the tensor's name),
so those tensors are reproducible here and differ from run to run there.
``prepare`` holds the two inputs of one tensor (compute dtype) for the row statistics and the
quantiles; ``combine`` is per entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.kernels import sphere
from weightsmith.merge.methods import sphere_native
from weightsmith.merge.methods.base import (
    NATIVE_PIECE,
    ChunkSource,
    MergeMethod,
    TensorParams,
    merge_method,
    merge_tensors,
    whole,
)

SAMPLE = 1_000_000  # mergekit's quantile sample size
EPS = 1e-8


def row_kl(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) ‖ softmax(base)) per row (last dimension), as a column: mergekit's
    ``sum(p * log(p / q))`` with ``p, q = softmax + ε``, the same ops done in place (the same
    bits, two temporaries instead of six)."""
    p = F.softmax(x, dim=-1).add_(EPS)
    q = F.softmax(base, dim=-1).add_(EPS)
    log_ratio = torch.div(p, q, out=q).log_()
    return torch.sum(p.mul_(log_ratio), dim=-1, keepdim=True)


def sample_indices(numel: int, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``SAMPLE`` flat indices (with replacement, seeded by the tensor's name) whose
    importances give the quantiles of a tensor over ``SAMPLE`` entries. Drawn on the CPU
    whatever ``device`` is, so a CUDA merge samples the same entries as a CPU one."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(numel, (SAMPLE,), generator=gen).to(device)


def fusion_threshold(importance: torch.Tensor, name: str = "") -> torch.Tensor:
    """median + 1.5·IQR of the flat importances (a 1M sample of bigger tensors)."""
    flat = importance.reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[sample_indices(flat.numel(), name, flat.device)]
    return quantile_threshold(flat)


def quantile_threshold(flat: torch.Tensor) -> torch.Tensor:
    """median + 1.5·IQR of the values (quantiles at index ⌊q·(n−1)⌋ of the sorted values; a
    CPU bfloat16 tensor's by counting its bit patterns instead of sorting: the same values)."""
    at = quantile_ranks(flat.numel())
    if flat.dtype == torch.bfloat16 and flat.device.type == "cpu" and sphere.library():
        q1, median, q3 = sphere.order_stats(flat.contiguous(), at.tolist())
    else:
        q1, median, q3 = torch.sort(flat).values[at.to(flat.device)]
    return median + 1.5 * (q3 - q1)


def quantile_ranks(n: int) -> torch.Tensor:
    """The ranks of q₁, the median and q₃ among n sorted values, as torch.quantile's lower."""
    return (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long()


@merge_method("arcee_fusion")
class ArceeFusion(MergeMethod):
    tensor_statistics = True
    stats_ahead = True
    whole_tensor = True
    title = "Arcee Fusion"
    reference = "https://arcee.ai"
    needs_base = True
    exact_inputs = 2

    def prepare(self, src: ChunkSource, params: TensorParams) -> tuple[torch.Tensor, Any, int]:
        dt = params.dtype
        cols = src.shape[-1] if src.shape else 1
        base = whole(src, 0, dt).reshape(-1, cols)
        x = whole(src, 1, dt).reshape(-1, cols)
        kl = row_kl(x, base)
        threshold = fusion_threshold((x - base).abs() * kl, src.name)
        return kl.reshape(-1), threshold, cols

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic: :func:`fusion_state` from the stored inputs, then the native
        masked output."""
        if not sphere_native.applies(src, params, out_dtype):
            return None
        cols = src.shape[-1] if src.shape else 1

        def kernel(state: tuple[torch.Tensor, float]):
            kl32, threshold = state
            return lambda p, o, first: sphere.fusion_out(p, first, cols, kl32, threshold, o)

        return sphere_native.stream_mapped(
            src, out_dtype, lambda xs: fusion_state(src, xs, cols), kernel, offsets=True
        )

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        dt = params.dtype
        kl, threshold, cols = state
        base, x = (c.to(dt) for c in chunks)
        rows = torch.arange(offset, offset + base.numel(), device=base.device) // cols
        delta = x - base
        mask = ((x - base).abs() * kl[rows] >= threshold).float()
        return base + delta * mask  # float32, as mergekit's float mask makes it


def fusion_state(src: ChunkSource, xs: list[torch.Tensor], cols: int) -> tuple[torch.Tensor, float]:
    """(each row's KL as float32, the threshold) from the stored base and model ``xs``, in
    bfloat16 as mergekit: the KL in torch on blocks of rows in parallel (a row's softmax and sum
    do not depend on the other rows), the importances only where the quantiles need them."""
    rows, bf16 = src.numel // cols, torch.bfloat16
    kl = torch.empty(rows, dtype=bf16)
    block = max(1, NATIVE_PIECE // cols)

    sampled_at: list[torch.Tensor] = []

    def kl_rows(r0: int) -> None:
        if r0 < 0:  # the sample's draw, in memory order (the same quantiles), beside the KL
            sampled_at.append(sphere.block_order(sample_indices(src.numel, src.name), src.numel))
            return
        r1 = min(r0 + block, rows)
        b, x = (t[r0 * cols : r1 * cols].to(bf16).reshape(-1, cols) for t in xs)
        kl[r0:r1] = row_kl(x, b).reshape(-1)

    pmap(kl_rows, [*([-1] if src.numel > SAMPLE else []), *range(0, rows, block)])
    kl32 = kl.float()
    if src.numel <= SAMPLE:
        b, x = (t.to(bf16).reshape(-1, cols) for t in xs)
        return kl32, float(quantile_threshold(((x - b).abs() * kl.view(-1, 1)).reshape(-1)))
    return kl32, sampled_threshold(xs, sampled_at[0], cols, kl32)


def sampled_threshold(
    xs: list[torch.Tensor], idx: torch.Tensor, cols: int, kl32: torch.Tensor
) -> float:
    """The threshold from the importances at the sampled flat entries ``idx`` (block-ordered):
    mergekit's gathers and ops, natively, each part counted where it is made; the counts give
    the quantiles (the same values as sorting the sample)."""
    importance = torch.empty(SAMPLE, dtype=torch.bfloat16)

    def sampled(r: tuple[int, int]) -> torch.Tensor:
        part, counts = importance[r[0] : r[1]], sphere.bit_counts()
        sphere.fusion_sampled(xs, idx[r[0] : r[1]], cols, kl32, part)
        sphere.count_into(part, counts)
        return counts

    counts = torch.stack(pmap(sampled, sub_ranges(0, SAMPLE))).sum(0)
    q1, median, q3 = sphere.counted_ranks(counts, quantile_ranks(SAMPLE).tolist())
    return float(median + 1.5 * (q3 - q1))


def arcee_fusion(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion of ``model`` into ``base`` (float32 result)."""
    return merge_tensors("arcee_fusion", [base, model])
