"""HQQ-style data-free refinement of RTN's qparams (``--method rtn --hqq``).

Half-Quadratic Quantization (Badri & Shaji, 2023; mobiusml/hqq ``optimize_weights_proximal_legacy``)
fits the qparams of each group to the sparsity-promoting loss ``||W - Q(W)||_p^p`` with
``p = 0.7``, which lets a few outliers keep a large error instead of stretching the grid for
them. It splits the problem with an auxiliary error ``W_e`` and alternates

1. ``q = clamp(round(W / s) + z)``, ``W_r = (q - z) · s`` (the current reconstruction);
2. ``W_e = shrink_p(W - W_r, β)``: the generalised soft-threshold
   ``sign(x) · relu(|x| - |x|^(p-1) / β)`` (the proximal step of ``|·|^p``);
3. the qparams closest in least squares to ``W - W_e``: HQQ's zero step with the scale fixed,
   ``z = mean(q - (W - W_e) / s)``;
4. ``β ← κ · β``,

from min-max RTN's qparams, ``β = 10``, ``κ = 1.01``, 20 iterations, stopping early as HQQ does
when the tensor's mean absolute error stops falling.

Adapted to weightsmith's grids: compressed-tensors (and gptq) store *integer* zero points, and
symmetric grids have none, so step 3 also updates the scale, by least squares on the same
target with the zero fixed, ``s = Σ(q - z)(W - W_e) / Σ(q - z)²``:

- **asymmetric**: HQQ's zero step, rounded to an integer level (``>= zero_min``), then the
  scale for that zero;
- **symmetric**: the zero stays 0; only the scale is optimised.

Scales are rounded to the stored dtype at every step, and each group keeps the iterate with
the lowest ``||W - Q(W)||_p^p`` (the min-max start included), so no group's objective is worse
than RTN's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.compress.levels import level_range


@dataclass(frozen=True)
class HQQParams:
    """The solver's constants (HQQ's ``opt_params`` defaults)."""

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20


def shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    """Generalised soft-thresholding, the proximal operator of ``|x|^p / β``:
    ``sign(x) · max(|x| - |x|^(p-1) / β, 0)`` (``|x| - 1/β`` for ``p = 1``); 0 stays 0."""
    a = x.abs()
    thr = (1.0 / beta) if lp_norm == 1 else a.pow(lp_norm - 1) / beta
    return torch.sign(x) * (a - thr).clamp_min(0.0)


def _reconstruct(
    w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
    return (q - z) * s, q


def lp_error(w: torch.Tensor, w_r: torch.Tensor, lp_norm: float) -> torch.Tensor:
    """``Σ |W - W_r|^p`` over the last dimension (one value per group)."""
    return (w - w_r).abs().pow(lp_norm).sum(-1)


def hqq_step(
    w: torch.Tensor, w_r: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
    beta: float, lp_norm: float, symmetric: bool, dtype: torch.dtype, zero_range: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One half-quadratic update of ``(s, z)`` from the reconstruction ``w_r`` with levels ``q``:
    shrink the error, then HQQ's zero step (asymmetric; rounded into ``zero_range``) and the
    least-squares scale for that zero, rounded to ``dtype``."""
    target = w - shrink_lp(w - w_r, beta, lp_norm)
    if not symmetric:  # HQQ's zero step (scale fixed), on the integer grid
        z = torch.clamp(torch.round((q - target / s).mean(-1, keepdim=True)), *zero_range)
    d = q - z  # levels of the current assignment, relative to the zero
    den = d.pow(2).sum(-1, keepdim=True)
    s_ls = (d * target).sum(-1, keepdim=True) / den.clamp_min(1e-30)
    ok = (den > 0) & (s_ls > 0) & torch.isfinite(s_ls)
    return torch.where(ok, s_ls, s).to(dtype).float(), z


def hqq_qparams(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    symmetric: bool,
    *,
    dtype: torch.dtype,
    zero_min: int | None = None,
    params: HQQParams = HQQParams(),
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Refine the qparams ``(rows, 1)`` of the groups ``w`` ``(rows, g)`` (float32) by HQQ's
    half-quadratic solver (see the module docstring). Returns ``(scale, zero, info)``: scale
    rounded to ``dtype`` (as float32), integer-valued zero, and ``iterations`` run plus the
    ``lp_error``/``mse`` before and after (sums over the tensor)."""
    qmin, qmax = level_range(bits)
    zlo = qmin if zero_min is None else max(qmin, zero_min)
    s, z = scale.float(), zero.float()
    w_r, q = _reconstruct(w, s, z, qmin, qmax)
    best_s, best_z, best_obj = s, z, lp_error(w, w_r, params.lp_norm)
    start = {"lp_error_rtn": float(best_obj.sum()), "mse_rtn": float((w - w_r).pow(2).mean())}
    best_mean_abs = float((w - w_r).abs().mean())
    beta, it = params.beta, 0
    for _ in range(params.iters):
        it += 1
        s, z = hqq_step(w, w_r, q, s, z, beta, params.lp_norm, symmetric, dtype, (zlo, qmax))
        s = torch.where(s > 0, s, best_s)  # a scale that underflows the stored dtype
        beta *= params.kappa
        w_r, q = _reconstruct(w, s, z, qmin, qmax)
        obj = lp_error(w, w_r, params.lp_norm)
        better = (obj < best_obj).unsqueeze(-1)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_obj = torch.minimum(obj, best_obj)
        mean_abs = float((w - w_r).abs().mean())
        if mean_abs >= best_mean_abs:  # HQQ's early stop
            break
        best_mean_abs = mean_abs
    w_r, _ = _reconstruct(w, best_s, best_z, qmin, qmax)
    info = {
        **start,
        "iterations": it,
        "lp_error": float(best_obj.sum()),
        "mse": float((w - w_r).pow(2).mean()),
    }
    return best_s, best_z, info
