"""Task arithmetic and the shared core of TIES/DARE (mergekit's generalized task arithmetic).

With task vectors δ_i = x_i − base, weights w_i and an optional sparsified δ_i:
- no consensus: mixed = Σ w_i δ_i, divisor = Σ w_i;
- sign consensus (TIES): elect sign(Σ w_i δ_i) per entry (ties → +), keep only the entries
  whose sign agrees: mixed = Σ m_i w_i δ_i, divisor = Σ m_i w_i (0 → 1);
- ``normalize`` divides mixed by the divisor; ``lambda`` scales it; output = base + mixed.
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
from weightsmith.merge.params import BOOL


def combine_task_vectors(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
) -> torch.Tensor:
    """base + the (sign-elected, normalized, λ-scaled) weighted sum of ``deltas``.

    ``deltas`` are the method's own tensors and are overwritten (no copies per chunk).
    """
    weighted = [d if w == 1.0 else d.mul_(w) for d, w in zip(deltas, weights, strict=True)]
    mixed = weighted[0].clone()
    for wd in weighted[1:]:
        mixed.add_(wd)
    if consensus:
        majority = torch.where(mixed >= 0, 1.0, -1.0)  # ties go to +, as in mergekit
        mixed.zero_()
        divisor = torch.zeros_like(base) if normalize else None
        for wd, w in zip(weighted, weights, strict=True):
            agree = torch.sign(wd) == majority  # zeros (trimmed/dropped) never agree
            mixed.add_(wd.mul_(agree))
            if divisor is not None:
                divisor.add_(agree, alpha=w)
        if divisor is not None:
            mixed.div_(divisor.add_(divisor == 0))  # no agreeing weight: divide by 1
    else:
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            mixed.div_(total)
    if lam != 1.0:
        mixed.mul_(lam)
    return mixed.add_(base)


class GeneralizedTaskArithmetic(MergeMethod):
    """Task vectors → optional sparsification → optional sign consensus → weighted mix."""

    needs_base = True
    consensus: bool = False
    default_normalize: bool = False
    global_params = (
        Param("normalize", False, help="divide the mix by the (agreeing) weights' sum", kind=BOOL),
        Param("lambda", 1.0, help="scale of the mixed task vector"),
    )
    model_params = (Param("weight", required=True, help="weight of each task vector"),)

    def sparsify(
        self, delta: torch.Tensor, k: int, state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        return delta

    def native_sparsify(self, k: int, state: Any, params: TensorParams) -> native.Sparsify:
        """What ``sparsify`` does to task vector ``k``, as the native kernel's description."""
        return native.Sparsify()

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        if params.narrow:
            return self._combine_narrow(chunks, state, params, offset)
        base, models = chunks[0], chunks[1:]
        fused = native.gta_combine(
            base,
            models,
            params.model_values("weight"),
            [self.native_sparsify(k, state, params) for k in range(len(models))],
            offset,
            consensus=self.consensus,
            normalize=bool(params.globals["normalize"]),
            rescale=bool(params.globals.get("rescale", True)),
            lam=float(params.globals["lambda"]),
        )
        if fused is not None:  # one fused pass, bit-identical to the code below
            return fused
        deltas = [self.sparsify(x - base, k, state, params, offset) for k, x in enumerate(models)]
        return combine_task_vectors(
            base,
            deltas,
            params.model_values("weight"),
            consensus=self.consensus,
            normalize=bool(params.globals["normalize"]),
            lam=float(params.globals["lambda"]),
        )

    def _combine_narrow(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        """mergekit 0.1.5's ops in the compute dtype (bfloat16/float16), in its order: task
        vectors, sparsified, times the weights (rounded to the dtype), sign election, sums,
        divisor, λ, + base; every step rounded to the dtype as torch rounds it."""
        dt = params.dtype
        base = chunks[0].to(dt)
        deltas = torch.stack(
            [
                self.sparsify(x.to(dt) - base, k, state, params, offset)
                for k, x in enumerate(chunks[1:])
            ]
        )
        w = torch.tensor(params.model_values("weight"), dtype=dt, device=base.device)
        w = w.view(-1, 1)
        deltas.mul_(w)
        if self.consensus:
            majority = (deltas.sum(dim=0) >= 0).to(dt) * 2 - 1
            mask = deltas.sign() == majority
            mixed = (deltas * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if params.globals["normalize"]:
            mixed /= divisor
        lam = float(params.globals["lambda"])
        if lam != 1:
            mixed *= lam
        return base + mixed


def narrow_task_arithmetic_args(
    params: TensorParams,
) -> tuple[list[float], float | None, float | None]:
    """The bfloat16 weights, divisor (None: no division) and λ (None: 1) of mergekit's task
    arithmetic, computed with the torch ops of ``_combine_narrow``, for the native kernel."""
    w = torch.tensor(params.model_values("weight"), dtype=torch.bfloat16).view(-1, 1)
    divisor = w.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    lam = float(params.globals["lambda"])
    div = float(divisor) if params.globals["normalize"] else None
    return w.float().view(-1).tolist(), div, (lam if lam != 1 else None)


@merge_method("task_arithmetic")
class TaskArithmetic(GeneralizedTaskArithmetic):
    title = "Task arithmetic"
    reference = "https://arxiv.org/abs/2212.04089"

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """bfloat16 arithmetic: mergekit's ops fused in one native pass over the stored inputs
        (the same bits as ``_combine_narrow``), written as ``out_dtype``."""
        if params.dtype != torch.bfloat16 or out_dtype not in native.STORAGE:
            return None
        if not native.available():
            return None
        weights, div, lam = narrow_task_arithmetic_args(params)

        def kernel(xs: list[torch.Tensor], out: torch.Tensor):
            return native.narrow_mix(xs, native.TASK_ARITHMETIC, weights, div, lam, out)

        return stream_native(src, out_dtype, kernel)


def task_arithmetic(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: list[float],
    *,
    lam: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """base + λ·Σ w_i (x_i − base) (divided by Σ w_i when ``normalize``)."""
    params = TensorParams(
        "tensor",
        {"normalize": normalize, "lambda": lam},
        tuple({"weight": w} for w in weights),
    )
    return merge_tensors("task_arithmetic", [base, *models], params)
