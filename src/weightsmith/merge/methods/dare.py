"""DARE (Yu et al. 2023) as mergekit's ``dare_linear`` and ``dare_ties``.

Each task vector entry is kept with probability ``density`` and kept entries are rescaled by
1/density (``rescale``, on by default), so E[sparsified δ] = δ. ``dare_ties`` then elects signs
as TIES does. Each entry's draw comes from a counter-based generator (SplitMix64 seeded by
seed, tensor name and model index, indexed by the entry's position), so a run is reproducible
and independent of chunking, threads, device or tensor order. With a bfloat16/float16 compute dtype it follows
mergekit 0.1.5 instead: keep probability ``density`` rounded to that dtype, and ``rescale`` is
its L1 rescale (‖δ‖₁ / ‖kept δ‖₁, sums in that dtype), every op in that dtype.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from weightsmith.kernels import merge as native
from weightsmith.kernels.merge_narrow import Drop
from weightsmith.merge.methods import gta_native
from weightsmith.merge.methods.base import (
    ChunkSource,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
    stored_inputs,
)
from weightsmith.merge.methods.sparsify import NarrowMask, mergekit_l1_scale, narrow_deltas
from weightsmith.merge.methods.task_arithmetic import GeneralizedTaskArithmetic
from weightsmith.merge.params import BOOL, INT


def tensor_seed(seed: int, name: str, model: int) -> int:
    """A 63-bit seed for one task vector of one tensor."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{model}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(v: int) -> int:
    """A 64-bit constant as the int64 with the same bits (torch integer arithmetic wraps)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(seed: int, j: torch.Tensor) -> torch.Tensor:
    """SplitMix64's ``j``-th outputs (int64 bit patterns) for a generator seeded with ``seed``."""
    z = (j + 1) * _signed(_GOLDEN) + _signed(seed)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def uniform32(seed: int, i: torch.Tensor) -> torch.Tensor:
    """The uniform 32-bit draw (int64) of flat entries ``i``: the low half of SplitMix64(seed)'s
    output i//2 for even i, the high half for odd i (the native kernels' ``dare_uniform``)."""
    w = splitmix64(seed, i >> 1)
    return torch.where((i & 1).bool(), _shr(w, 32), w & 0xFFFFFFFF)


def keep_cut(density: float) -> int:
    """An entry is kept when its 32-bit uniform draw is below this (probability density)."""
    return round(density * 2**32)


def keep_mask(
    seed: int, offset: int, n: int, density: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Which of the entries ``[offset, offset + n)`` of a flat task vector DARE keeps.

    Entry i draws a uniform 32-bit integer u (the low half of SplitMix64(seed)'s output i//2
    for even i, the high half for odd i) and is kept when u < round(density·2³²), i.e. with
    probability density. A counter-based draw: the mask is the same however the tensor is
    chunked, whichever thread or device computes it, and the native kernel draws the same.
    """
    cut = keep_cut(density)
    if torch.device(device).type == "cpu":
        fused = native.dare_keep(seed, cut, offset, n)
        if fused is not None:
            return fused
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    return uniform32(seed, i) < cut


def dare_mask(
    delta: torch.Tensor, density: float, seed: int, offset: int = 0, rescale: bool = True
) -> torch.Tensor:
    """Drop entries of δ (flat offset ``offset``) with probability 1 − density; rescale the
    rest by 1/density."""
    keep = keep_mask(seed, offset, delta.numel(), density, delta.device)
    delta.mul_(keep.reshape(delta.shape))
    return delta.div_(density) if rescale else delta


class _Dare(GeneralizedTaskArithmetic):
    reference = "https://arxiv.org/abs/2311.03099"
    global_params = (
        Param("normalize", False, help="divide by the sum of the (agreeing) weights", kind=BOOL),
        Param("rescale", True, help="rescale kept entries by 1/density", kind=BOOL),
        Param("lambda", 1.0, help="scale of the mixed task vector"),
        Param("seed", 0, help="seed of the random drop masks", kind=INT),
    )
    model_params = (
        Param("weight", required=True, help="weight of each task vector"),
        Param(
            "density",
            1.0,
            help="probability of keeping each task-vector entry",
            low=0.0,
            low_open=True,
            high=1.0,
        ),
    )

    def prepare(self, src: ChunkSource, params: TensorParams) -> list[Any]:
        seed = int(params.globals["seed"])
        seeds: list[Any] = [tensor_seed(seed, params.name, k) for k in range(len(params.models))]
        if params.narrow:
            return narrow_masks(src, params, seeds)
        return seeds

    def sparsify(
        self, delta: torch.Tensor, k: int, state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        density = float(params.models[k]["density"])
        if density >= 1.0:
            return delta
        if isinstance(state[k], NarrowMask):
            return state[k].apply(delta, offset)
        return dare_mask(delta, density, state[k], offset, bool(params.globals["rescale"]))

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic in the native kernels (gta_native.py): the bits of
        ``narrow_masks`` + ``_combine_narrow``, the keep draws made on the fly."""
        if not gta_native.usable(src, params, out_dtype):
            return None
        seed = int(params.globals["seed"])
        drops = []
        for k, m in enumerate(params.models):
            density = float(m["density"])
            p = float(torch.tensor(density, dtype=params.dtype))
            if density < 1.0 and keep_cut(p) == 0:
                return None  # nothing kept: the torch path
            drop = Drop(seed=tensor_seed(seed, params.name, k), cut=keep_cut(p))
            drops.append(drop if density < 1.0 else Drop())
        return self._stream_narrow(src, params, out_dtype, drops)

    def _stream_narrow(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype, drops: list[Drop]
    ) -> Iterator[torch.Tensor]:
        if params.globals["rescale"]:
            with stored_inputs(src) as stored:
                drops = [
                    replace(d, scale=gta_native.l1_scale(src, stored, k, d)) if d.cut else d
                    for k, d in enumerate(drops)
                ]
            del stored  # unmap before the second pass maps the inputs again
        yield from gta_native.stream_gta(src, params, out_dtype, self.consensus, drops)

    def native_sparsify(self, k: int, state: Any, params: TensorParams) -> native.Sparsify:
        density = float(params.models[k]["density"])
        if density >= 1.0:
            return native.Sparsify()
        cut = keep_cut(density)
        return native.Sparsify(native.DARE, seed=state[k], cut=cut, density=density)


def narrow_masks(src: ChunkSource, params: TensorParams, seeds: list[int]) -> list[Any]:
    """DARE as mergekit computes it in a narrow dtype: keep probability ``density`` rounded
    to that dtype (its Bernoulli draws from a tensor of that dtype), and with ``rescale`` its
    L1 rescale (‖δ‖₁ / ‖kept δ‖₁, sums in that dtype) instead of 1/density."""
    out: list[Any] = list(seeds)
    active = [k for k, m in enumerate(params.models) if float(m["density"]) < 1.0]
    for k, delta in narrow_deltas(src, active, params.dtype):
        p = float(torch.tensor(float(params.models[k]["density"]), dtype=params.dtype))
        mask = keep_mask(seeds[k], 0, delta.numel(), p, delta.device)
        scale = mergekit_l1_scale(delta, mask) if params.globals["rescale"] else None
        out[k] = NarrowMask(mask, scale)
    return out


@merge_method("dare_linear")
class DareLinear(_Dare):
    title = "DARE (linear)"


@merge_method("dare_ties")
class DareTies(_Dare):
    title = "DARE-TIES"
    consensus = True


def dare(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: list[float],
    density: float,
    *,
    ties: bool = False,
    seed: int = 0,
    normalize: bool = False,
    rescale: bool = True,
    name: str = "tensor",
) -> torch.Tensor:
    """DARE-merge ``models`` onto ``base`` (float32 result)."""
    params = TensorParams(
        name,
        {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "seed": seed},
        tuple({"weight": w, "density": density} for w in weights),
    )
    return merge_tensors("dare_ties" if ties else "dare_linear", [base, *models], params)
