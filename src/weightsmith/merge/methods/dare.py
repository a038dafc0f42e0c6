"""DARE (Yu et al. 2023) as mergekit's ``dare_linear`` and ``dare_ties``.

Each task vector entry is kept with probability ``density`` and kept entries are rescaled by
1/density (``rescale``, on by default), so E[sparsified δ] = δ. ``dare_ties`` then elects signs
as TIES does. Masks come from a generator seeded by (seed, tensor name, model index) and drawn
in storage order, so a run is reproducible and independent of chunking or tensor order.
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


def dare_mask(
    delta: torch.Tensor, density: float, gen: torch.Generator, rescale: bool = True
) -> torch.Tensor:
    """Drop entries of δ with probability 1 − density; rescale the rest by 1/density."""
    keep = torch.rand(delta.numel(), generator=gen, dtype=torch.float32) < density
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

    def prepare(self, src: ChunkSource, params: TensorParams) -> list[torch.Generator]:
        seed = int(params.globals["seed"])
        return [
            torch.Generator().manual_seed(tensor_seed(seed, params.name, k))
            for k in range(len(params.models))
        ]

    def sparsify(
        self, delta: torch.Tensor, k: int, state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        density = float(params.models[k]["density"])
        if density >= 1.0:
            return delta
        return dare_mask(delta, density, state[k], bool(params.globals["rescale"]))


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
