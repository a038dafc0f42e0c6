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
* N:M, ``nm_select="score"`` (the reference's rule): the N lowest scores of every M consecutive
  columns of each row (ties: lower index);
* N:M, ``nm_select="obs"`` (the default): of the C(M, N) ways to prune N of the M columns, the
  one that adds least to the layer's loss when the group is processed as the loop processes it
  (column by column, each pruned weight's OBS update applied to the columns after it, including
  the group's own). The score rule ranks the M columns independently on the weights as they are
  when the group is reached, ignoring that pruning one column changes the others; this choice
  is exact for the group (still greedy across groups). Patterns with C(M, N) > 70 (e.g. 8:16)
  use the score rule.

One deliberate difference: when M does not divide ``block_size``, blocks are shortened to a
multiple of M so that no group of M straddles two blocks (the reference scores such a group
on a truncated slice). With the default 128 and M = 4, 8, 16, ... nothing changes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from weightsmith.compress.prune.common import LinearTarget
from weightsmith.compress.prune.masks import count_to_prune
from weightsmith.compress.prune.registry import (
    NM_SELECT,
    SPARSEGPT_DAMP,
    PruneConfig,
    prune_method,
)
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


MAX_NM_COMBINATIONS = 70  # C(8, 4): 4:8 is still exact


def nm_combinations(m: int, n: int, device: torch.device) -> torch.Tensor | None:
    """Every way to prune ``n`` of ``m`` columns, as ``(C, n)`` column indices in
    ``itertools.combinations`` order; None when there are more than MAX_NM_COMBINATIONS."""
    combos = list(itertools.combinations(range(m), n))
    if len(combos) > MAX_NM_COMBINATIONS:
        return None
    return torch.tensor(combos, dtype=torch.long, device=device)


def obs_error_maps(U: torch.Tensor, combos: torch.Tensor, m: int) -> torch.Tensor:
    """For each group of ``m`` columns of the upper factor ``U`` (``(cols, cols)``), the
    ``(m, C·N)`` map from a row's group weights to the errors of every combination.

    Processing a group column by column, a pruned column's error is ``err_j = w_j / U_jj``
    after the earlier pruned columns' updates ``w_j -= err_i·U_ij`` (kept columns add none),
    i.e. ``U_SSᵀ err = w_S``: ``err = w_S · U_SS⁻¹`` as a row vector. Returns ``(G, m, C·N)``."""
    g = U.shape[0] // m
    blocks = U.reshape(g, m, g, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (G, m, m)
    sub = blocks[:, combos[:, :, None], combos[:, None, :]]  # (G, C, N, N) upper triangular
    eye = torch.eye(combos.shape[1], dtype=U.dtype, device=U.device).expand_as(sub)
    inv = torch.linalg.solve_triangular(sub, eye, upper=True)  # U_SS⁻¹
    c, n = combos.shape
    maps = torch.zeros(g, m, c, n, dtype=U.dtype, device=U.device)
    maps[:, combos, torch.arange(c, device=U.device)[:, None]] = inv  # row s_k of combo c
    return maps.reshape(g, m, c * n)


def obs_group_mask(Wg: torch.Tensor, maps: torch.Tensor, combos: torch.Tensor) -> torch.Tensor:
    """The ``(rows, m)`` mask that adds least to the loss ``Σ err²`` for the group's current
    ``(rows, m)`` weights ``Wg``, given its :func:`obs_error_maps` entry ``maps``
    (``(m, C·N)``). Ties: the first combination."""
    c, n = combos.shape
    loss = (Wg @ maps).square_().reshape(-1, c, n).sum(dim=2)  # (rows, C)
    best = combos[loss.argmin(dim=1)]  # (rows, N)
    return torch.zeros_like(Wg, dtype=torch.bool).scatter_(1, best, True)


def _score_group_mask(Wg: torch.Tensor, d2: torch.Tensor, n: int) -> torch.Tensor:
    """The reference's N:M rule on one group: the N lowest ``w² / U_jj²`` per row."""
    idx = torch.sort(Wg.pow(2) / d2[None, :], dim=1, stable=True).indices[:, :n]
    return torch.zeros_like(Wg, dtype=torch.bool).scatter_(1, idx, True)


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
    nm_select: str = "obs",
) -> SparseWeight:
    """SparseGPT on one ``(out, in)`` weight with its ``(in, in)`` Hessian: ``sparsity``
    (unstructured) or ``pattern=(N, M)``, one of them; ``nm_select`` picks the N:M rule (module
    docstring). Pure: inputs are not modified."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("give sparsity or pattern, one of them")
    if nm_select not in NM_SELECT:
        raise ValueError(f"nm_select must be one of {NM_SELECT}, got {nm_select!r}")
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
    combos = nm_combinations(m, n, W.device) if m and nm_select == "obs" else None
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_hessian_factor(H, damp)
    del H
    maps = obs_error_maps(Hinv, combos, m) if combos is not None else None
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
                Wg = W1[:, i : i + m]
                mask1[:, i : i + m] = (
                    _score_group_mask(Wg, d2[i : i + m], n)
                    if combos is None
                    else obs_group_mask(Wg, maps[(i1 + i) // m], combos)
                )
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
                nm_select=cfg.nm_select,
            )  # fmt: skip
        except HessianNotInvertible as e:
            raise HessianNotInvertible(f"layer {cl.index} {n}: {e}") from None
        cl.set_weight(n, r.weight)  # later layers see the pruned layer
        done[cl.tensor_name(n)] = r.weight.cpu()
    return done
