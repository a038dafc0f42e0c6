"""SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774): prune a Linear column by column and
update the weights it keeps with the optimal-brain-surgeon correction, using the inverse
Hessian of the layer-wise reconstruction loss ``||WX - ŴX||²`` (the same Hessian GPTQ uses,
``H = 2/n · Σ x xᵀ``, from the ``"hessian"`` statistic).

Follows the reference ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt ``sparsegpt.py``, also
llm-compressor's ``sparsify_weight``): dead inputs (``H_jj = 0``) are zeroed,
``H += damp·mean(diag H)·I``, the upper Cholesky factor ``U`` of ``H⁻¹`` drives the updates,
and columns are processed in blocks of ``block_size`` (128) with the rest of the matrix updated
once per block. The mask is chosen by ``w² / U_jj²``, on the weights as they are when their
block (unstructured) or their group of M columns (N:M) is reached:

* unstructured: per block of columns, over all rows together, every score ``<=`` the score
  at sorted position ``floor(numel · sparsity)`` is pruned, i.e. ``floor(numel · sparsity) + 1``
  entries per block (more only on exact ties) — the reference's rule, kept so that masks are
  identical to it and to llm-compressor;
* N:M: the N lowest scores of every M consecutive columns of each row (ties: lower index).

One deliberate difference: when M does not divide ``block_size``, blocks are shortened to a
multiple of M so that no group of M straddles two blocks (the reference scores such a group
on a truncated slice). With the default 128 and M = 4, 8, 16, ... nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.compress.prune.common import LinearTarget
from weightsmith.compress.prune.masks import count_to_prune
from weightsmith.compress.prune.registry import SPARSEGPT_DAMP, PruneConfig, prune_method
from weightsmith.core.calibration import CalibrationLayer
from weightsmith.errors import ConfigError


class HessianNotInvertible(ConfigError):
    """``H + damp·mean(diag H)·I`` has no Cholesky factor."""


@dataclass
class SparseWeight:
    """A pruned and OBS-updated ``(out, in)`` float32 weight, its mask (``True`` = pruned)
    and the reference's loss estimate ``Σ (w - q)² / U_jj² / 2``."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float


def inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹`` (``H`` is modified)."""
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError:
        raise HessianNotInvertible(
            f"the damped Hessian is not positive definite (damp {damp}); "
            "raise --damp or use more calibration data"
        ) from None


def _block_mask(W1: torch.Tensor, d2: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's unstructured mask of one block: scores ``<=`` the k-th smallest."""
    tmp = W1.pow(2) / d2[None, :]
    k = count_to_prune(tmp.numel(), sparsity)
    thresh = torch.sort(tmp.flatten()).values[k]
    return tmp <= thresh


@prune_method(
    "sparsegpt",
    kind="unstructured",
    needs_calibration=True,
    compare="tensor",
    updates_weights=True,
    description="w² / [H⁻¹]_jj² per block of 128 columns, kept weights OBS-updated (Hessian "
    "of the calibration inputs)",
)
def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = SPARSEGPT_DAMP,
) -> SparseWeight:
    """SparseGPT on one ``(out, in)`` weight with its ``(in, in)`` Hessian: ``sparsity``
    (unstructured) or ``pattern=(N, M)``, one of them. Pure: inputs are not modified."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("give sparsity or pattern, one of them")
    W = w.detach().float().clone()
    H = hessian.detach().float().clone().to(W.device)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(H.shape)} does not fit weight {tuple(W.shape)}")
    n = m = 0
    if pattern is not None:
        n, m = pattern
        if cols % m:
            raise ValueError(f"{cols} input columns are not divisible by M={m}")
        block_size = max(m, block_size - block_size % m)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_hessian_factor(H, damp)
    del H
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    loss = torch.zeros(rows, dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d2 = torch.diag(Hinv1).pow(2)
        if pattern is None:
            mask1 = _block_mask(W1, d2, sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if m and i % m == 0:
                tmp = W1[:, i : i + m].pow(2) / d2[None, i : i + m]
                idx = torch.sort(tmp, dim=1, stable=True).indices[:, :n]
                mask1.scatter_(1, i + idx, True)
            w_i = W1[:, i]
            removed = w_i * mask1[:, i]  # w - q: the pruned entries' values
            d = Hinv1[i, i]
            loss += (removed.double() / d) ** 2 / 2
            err = removed / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            W1[:, i].masked_fill_(mask1[:, i], 0.0)  # exactly zero, whatever the rounding
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return SparseWeight(W, mask, float(loss.sum()))


def sparsegpt_layer(
    cl: CalibrationLayer, targets: dict[str, LinearTarget], cfg: PruneConfig
) -> dict[str, torch.Tensor]:
    """SparseGPT on one decoder layer's target Linears: the updated ``(out, in)`` float32
    weights by tensor name. As the reference (and llm-compressor) do, the Hessians of all of
    them are collected in one pass over the layer as it is, then each Linear is pruned; the
    layer's weights are replaced so that later layers calibrate on the pruned layer."""
    names = [n for n in cl.linear_names if cl.tensor_name(n) in targets]
    stats = cl.collect(names, "hessian")
    done = {}
    for n in names:
        stat = stats.pop(n)
        if stat.n == 0:
            raise ConfigError(f"layer {cl.index}: {n} never ran during calibration")
        try:
            r = sparsegpt_prune(
                cl.weight(n), stat.result(), sparsity=None if cfg.pattern else cfg.target_sparsity,
                pattern=cfg.pattern, block_size=cfg.block_size, damp=cfg.damp,
            )  # fmt: skip
        except HessianNotInvertible as e:
            raise HessianNotInvertible(f"layer {cl.index} {n}: {e}") from None
        cl.set_weight(n, r.weight)  # later layers see the pruned layer
        done[cl.tensor_name(n)] = r.weight.cpu()
    return done
