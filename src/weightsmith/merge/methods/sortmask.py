"""mergekit's sort-based masks of a task vector in a narrow compute dtype, bit for bit, and the
masked bfloat16 task arithmetic that uses them.

mergekit's ``magnitude`` (TIES) keeps ``argsort(|δ|, descending=True)[:k]`` and
``magnitude_outliers`` (breadcrumbs) ``sort(|δ|).indices[lo:hi]``, with δ = x − base in the
compute dtype and |δ| cast to float32 for the sort. A bfloat16 δ has many equal magnitudes, so
which of them survive is torch's unstable sort's own pick. The native selection
(:mod:`weightsmith.kernels.narrow`) replays that sort only as far as the wanted positions, in
expected linear time and 7 bytes per entry; without it (no compiler, a float16 compute dtype,
or the rare depth-limit case) the whole δ is sorted by torch as mergekit does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.io.reader import drop_mapped_pages
from weightsmith.kernels import narrow as native
from weightsmith.kernels.merge_narrow import Drop
from weightsmith.merge.methods.base import ChunkSource, TensorParams, whole
from weightsmith.merge.methods.gta_native import stream_gta, usable

Wanted = tuple[int, int, bool]  # positions [lo, hi) of the sort, descending or not
PARALLEL_BYTES = 256 << 20  # select several task vectors at once while their keys fit this


def sort_range_mask(
    src: ChunkSource, k: int, dtype: torch.dtype, lo: int, hi: int, *, descending: bool
) -> torch.Tensor:
    """Flat bool mask of the entries of task vector ``k`` (input k + 1 minus input 0, in
    ``dtype``) that torch's default sort of their float32 magnitudes puts at positions
    [lo, hi)."""
    if dtype == torch.bfloat16 and native.available(src.numel):
        mask = _chunked_mask(src, k, (lo, hi, descending))
        if mask is not None:
            return mask
    w = whole(src, k + 1, dtype, minus=0).abs_()
    if w.device.type == "cpu":
        w = w.float()
    order = torch.sort(w, descending=descending).indices
    del w
    mask = torch.zeros(src.numel, dtype=torch.bool, device=order.device)
    mask[order[lo:hi]] = True
    return mask


def _chunked_mask(src: ChunkSource, k: int, wanted: Wanted) -> torch.Tensor | None:
    keys = native.SortKeys(src.numel, descending=wanted[2])
    pos = 0
    for base, x in src.chunks([0, k + 1]):
        if base.device.type != "cpu":
            return None
        base, x = base.contiguous(), x.contiguous()

        def fill(r: tuple[int, int], base=base, x=x, pos=pos) -> None:
            keys.fill_absdelta(base[r[0] : r[1]], x[r[0] : r[1]], pos + r[0])

        pmap(fill, sub_ranges(0, base.numel()))
        pos += base.numel()
    return keys.select(wanted[0], wanted[1])


def stored_masks(src: ChunkSource, wanted: dict[int, Wanted]) -> dict[int, torch.Tensor] | None:
    """The masks of :func:`sort_range_mask` (bfloat16 δ) for several task vectors, from the
    inputs as stored; several at once while their keys fit ``PARALLEL_BYTES``. None when the
    native selection cannot decide one (the caller then takes the torch path)."""
    with contextlib.ExitStack() as stack:
        stored = [stack.enter_context(src.stored(i)) for i in range(src.num_inputs)]

        def one(k: int) -> torch.Tensor | None:
            keys = native.SortKeys(src.numel, descending=wanted[k][2])

            def fill(r: tuple[int, int]) -> None:
                bad = keys.fill_absdelta(stored[0][r[0] : r[1]], stored[k + 1][r[0] : r[1]], r[0])
                for i, count in zip((0, k + 1), bad, strict=True):
                    if count:
                        src.fail_nonfinite(i)
                    drop_mapped_pages(stored[i], r[0], r[1])

            pmap(fill, sub_ranges(0, src.numel))  # sequential inside a pool worker
            return keys.select(wanted[k][0], wanted[k][1])

        models = sorted(wanted)
        if src.numel * 7 * len(models) <= PARALLEL_BYTES:
            masks = pmap(one, models)
        else:
            masks = [one(k) for k in models]
    if any(m is None for m in masks):
        return None
    return dict(zip(models, masks, strict=True))


def stream_masked(
    src: ChunkSource,
    params: TensorParams,
    out_dtype: torch.dtype,
    masks: dict[int, torch.Tensor],
    *,
    consensus: bool,
) -> Iterator[torch.Tensor]:
    """mergekit's bfloat16 task arithmetic with these masks (task vectors without one are kept
    whole; ``consensus``: TIES sign election and per-entry divisor), one native pass over the
    stored inputs (:func:`~weightsmith.merge.methods.gta_native.stream_gta`)."""
    drops = [Drop(mask=masks.get(k)) for k in range(len(params.models))]
    return stream_gta(src, params, out_dtype, consensus, drops)


def can_stream(src: ChunkSource, params: TensorParams, out_dtype: torch.dtype) -> bool:
    """Whether :func:`stored_masks` / :func:`stream_masked` take this tensor."""
    return usable(src, params, out_dtype) and native.available(src.numel)
