"""DARE (Yu et al. 2023) as mergekit's ``dare_linear`` and ``dare_ties``.

Each task vector entry is kept with probability ``density`` and kept entries are rescaled by
1/density (``rescale``, on by default), so E[sparsified δ] = δ. ``dare_ties`` then elects signs
as TIES does. Masks are drawn in blocks of 65,536 entries, each from a generator seeded by
(seed, tensor name, model index, block), so a run is reproducible and independent of chunking,
threads or tensor order.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from weightsmith.errors import ConfigError
from weightsmith.merge.methods.base import (
    ChunkSource,
    Param,
    TensorParams,
    merge_method,
    merge_tensors,
)
from weightsmith.merge.methods.task_arithmetic import GeneralizedTaskArithmetic


def tensor_seed(seed: int, name: str, model: int) -> int:
    """A 63-bit seed for one task vector of one tensor."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{model}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


BLOCK = 1 << 16  # entries per independently seeded block of the drop mask


def block_seed(seed: int, block: int) -> int:
    """The seed of one ``BLOCK``-entry block of a task vector's mask (63 bits)."""
    return (seed + (block + 1) * 0x9E3779B97F4A7C15) % (1 << 63)


def keep_mask(seed: int, offset: int, n: int, density: float) -> torch.Tensor:
    """Which of the entries ``[offset, offset + n)`` of a flat task vector DARE keeps.

    Every ``BLOCK`` of entries draws its uniforms from its own generator, so a mask is the
    same however the tensor is chunked or whichever thread computes it.
    """
    # Uniform 32-bit integers, two per 64-bit draw (half the generator calls of torch.rand):
    # an entry is kept when u < density·2³², i.e. with probability density (to within 2⁻³²).
    cut = round(density * 2**32) - 2**31
    parts = []
    for blk in range(offset // BLOCK, (offset + n - 1) // BLOCK + 1):
        gen = torch.Generator().manual_seed(block_seed(seed, blk))
        words = torch.randint(-(2**63), 2**63 - 1, (BLOCK // 2,), generator=gen, dtype=torch.int64)
        u = words.view(torch.int32)
        a = max(offset, blk * BLOCK) - blk * BLOCK
        b = min(offset + n, (blk + 1) * BLOCK) - blk * BLOCK
        parts.append(u[a:b] < cut)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def dare_mask(
    delta: torch.Tensor, density: float, seed: int, offset: int = 0, rescale: bool = True
) -> torch.Tensor:
    """Drop entries of δ (flat offset ``offset``) with probability 1 − density; rescale the
    rest by 1/density."""
    keep = keep_mask(seed, offset, delta.numel(), density)
    delta.mul_(keep.reshape(delta.shape).to(delta.device))
    return delta.div_(density) if rescale else delta


class _Dare(GeneralizedTaskArithmetic):
    reference = "https://arxiv.org/abs/2311.03099"
    global_params = (
        Param("normalize", False, help="divide by the sum of the (agreeing) weights"),
        Param("rescale", True, help="rescale kept entries by 1/density"),
        Param("lambda", 1.0, help="scale of the mixed task vector"),
        Param("seed", 0, help="seed of the random drop masks"),
    )
    model_params = (
        Param("weight", required=True, help="weight of each task vector"),
        Param("density", 1.0, help="probability of keeping each task-vector entry"),
    )

    def validate(self, params: TensorParams) -> None:
        for d in params.model_values("density"):
            if not 0.0 < d <= 1.0:
                raise ConfigError(f"{params.name}: density must be in (0, 1], got {d}")

    def prepare(self, src: ChunkSource, params: TensorParams) -> list[int]:
        seed = int(params.globals["seed"])
        return [tensor_seed(seed, params.name, k) for k in range(len(params.models))]

    def sparsify(
        self, delta: torch.Tensor, k: int, state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        density = float(params.models[k]["density"])
        if density >= 1.0:
            return delta
        return dare_mask(delta, density, state[k], offset, bool(params.globals["rescale"]))


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
