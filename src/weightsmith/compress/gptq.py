"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): quantize a Linear column by column while
compensating the error on the not-yet-quantized columns with the inverse Hessian of the
layer-wise reconstruction loss ``||WX - ŴX||²``.

Follows the reference ``gptq.py`` (IST-DASLab/gptq, ``GPTQ.fasterquant``): dead inputs
(``H_ii = 0``) are zeroed, ``H += damp·mean(diag H)·I``, the upper Cholesky factor of ``H⁻¹``
drives the updates (Alg. 1), columns are processed in blocks of 128 with the rest of the matrix
updated lazily once per block, and with act-order the columns run in order of decreasing
``H_ii`` while group qparams are fixed up front on the original order ("static groups"), so
``g_idx`` stays ``i // group_size`` and inference kernels need no reordering. One deliberate
difference: a group's qparams are computed from the *current* (error-compensated) weights even
when the group starts inside a block (the reference reads stale values there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.compress.levels import level_range
from weightsmith.compress.mse import MSEConfig, clip_ratios, mse_qparams
from weightsmith.compress.registry import (
    CalibratedConfig,
    CalibrationFailed,
    GridConfig,
    QuantizedWeight,
    quant_method,
)
from weightsmith.compress.rtn import group_qparams, minmax_qparams, zero_min_for
from weightsmith.core.statistics import HessianStat  # noqa: F401  (re-exported)
from weightsmith.errors import ConfigError
from weightsmith.kernels.gptq import gptq_columns, gptq_kernels

# Dampening (fraction of mean diag(H) added to the diagonal), chosen by measurement on held-out
# text: 0.1 beat 0.01 on 3 of 4 held-out w3/w4 perplexities and tied the fourth
# (BENCHMARKS.md, "GPTQ dampening on held-out text"). SparseGPT keeps 0.01.
DEFAULT_DAMP = 0.1
# Each group's qparams: the MSE-clipped range (as --method mse) on its error-compensated weights,
# chosen by held-out measurement: it beat min-max GPTQ on 3 of 4 held-out w3/w4 perplexities and
# beat both data-free RTN and --method mse on all 4 (BENCHMARKS.md, "GPTQ observer on held-out
# text"). AWQ's --awq-then gptq keeps min-max (llm-compressor's).
DEFAULT_OBSERVER = "mse"


class HessianNotPositiveDefinite(CalibrationFailed):
    """``H + damp·I`` has no Cholesky factor (too little or degenerate calibration data)."""

    hint = "raise --damp, use more calibration data, or pass --allow-rtn-fallback"


def _qparams_for(
    w: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype, zero_min: int | None,
    ratios: list[float] | None = None,
):  # fmt: skip
    """Qparams of each row of ``w`` ``(out, g)``: min-max, or with ``ratios`` the MSE-optimal
    clipped range (:func:`~weightsmith.compress.mse.mse_qparams`); scale rounded to ``dtype``."""
    if ratios is not None:
        return mse_qparams(w, bits, symmetric, dtype, zero_min, ratios)[:2]
    scale, zero = minmax_qparams(w, bits, symmetric)
    scale = scale.to(dtype).float()
    if not symmetric:  # recompute the zero for the rounded scale
        lo = w.min(-1, keepdim=True).values.clamp(max=0)
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        zero = torch.clamp(torch.round(qmin - lo / scale), zero_min or qmin, qmax)
    return scale, zero


def gptq_quantize_weight(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    block_size: int = 128,
    dtype: torch.dtype | None = None,
    zero_min: int | None = None,
    overwrite_hessian: bool = False,
    observer: str = "minmax",
) -> QuantizedWeight:
    """GPTQ on one ``(out, in)`` weight with Hessian ``(in, in)``; ``group_size=-1`` is per
    channel. Scales are rounded to ``dtype`` (the stored dtype) before use. ``observer``
    chooses each group's qparams: ``minmax``, or ``mse`` (the clipped range with the least
    squared error on the group's current weights, as ``--method mse`` does). Raises
    :class:`HessianNotPositiveDefinite` when the damped Hessian has no Cholesky factor.

    Memory: besides ``W`` it holds two ``(in, in)`` float32 matrices at any time (the
    Cholesky steps write into each other's storage). ``overwrite_hessian=True`` lets it use a
    float32 ``hessian`` as one of them (its contents are destroyed); otherwise it is copied."""
    dtype = dtype or w.dtype
    W = w.detach().float().clone()
    cols = W.shape[1]
    g = cols if group_size == -1 else group_size
    dead, perm, Hinv = _FACTORS.get(hessian, damp, act_order, W.device, overwrite_hessian)
    W[:, dead] = 0

    ratios = clip_ratios(MSEConfig()) if observer == "mse" else None
    static_scale = static_zero = None
    if group_size == -1 or act_order:  # qparams fixed before the pass, on the original order
        static_scale, static_zero = _static_qparams(W, g, bits, symmetric, dtype, zero_min, ratios)
    if perm is not None:
        W = W[:, perm]
    grid = _Grid(bits, g, symmetric, dtype, zero_min, perm, ratios)
    Q, scale, zero, loss = _quantize_columns(W, Hinv, grid, block_size, static_scale, static_zero)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return QuantizedWeight(
        q=Q.cpu(),
        scale=scale.to(dtype).cpu(),
        zero=zero.to(torch.int8).cpu(),
        bits=bits,
        group_size=g,
        symmetric=symmetric,
        g_idx=(torch.arange(cols) // g).to(torch.int32),
        info={"loss": float(loss.sum())},
    )


@dataclass(frozen=True)
class _Grid:
    """What the column loop needs to know about the quantization grid."""

    bits: int
    g: int  # columns per group
    symmetric: bool
    dtype: torch.dtype
    zero_min: int | None
    perm: torch.Tensor | None  # act-order column order (None: natural)
    ratios: list[float] | None = None  # the mse observer's clip ratios (None: min-max)


def _static_qparams(W, g, bits, symmetric, dtype, zero_min, ratios):
    """Qparams ``(out, n_groups)`` of every group of ``W`` before the pass (act-order, per
    channel): min-max, or the mse observer's on the original weights."""
    if ratios is None:
        return group_qparams(W, bits, g, symmetric, dtype, zero_min)
    out_f, cols = W.shape
    rows = W.reshape(out_f * (cols // g), g)
    scale, zero = _qparams_for(rows, bits, symmetric, dtype, zero_min, ratios)
    return scale.reshape(out_f, cols // g), zero.reshape(out_f, cols // g)


def _factor(H: torch.Tensor, damp: float, act_order: bool, device: torch.device):
    """What GPTQ needs of a Hessian (``H``, float32, destroyed): the dead inputs, the
    act-order permutation (None without) and the upper factor of the damped, permuted
    inverse."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if H.device != device:
        H = H.to(device)
    return dead, perm, _inverse_cholesky(H, damp, perm)


class _FactorCache:
    """The last Hessian's factorization, reused when the next Linear's Hessian is the very
    same matrix (``torch.equal``): q/k/v and gate/up share their inputs, hence their
    Hessians (the calibration engine hands out exact copies), so the Cholesky steps and the
    permutation run once per sharing set. Only Hessians up to :attr:`MAX_BYTES` are kept (the
    cache holds a copy of the Hessian and the factor: two more ``(in, in)`` matrices)."""

    MAX_BYTES = 32 << 20

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.hessian: torch.Tensor | None = None
        self.value: tuple | None = None

    def get(self, hessian: torch.Tensor, damp: float, act_order: bool,
            device: torch.device, overwrite: bool):  # fmt: skip
        """``(dead, perm, Hinv)`` of ``hessian`` (see :func:`_factor`); ``overwrite``: its
        float32 storage may be used. The returned tensors must not be modified."""
        H = hessian.detach()
        key = (damp, act_order, device, H.device, tuple(H.shape))
        if self.key == key and self.hessian is not None and torch.equal(self.hessian, H):
            return self.value
        self.key = self.hessian = self.value = None  # release the previous one first
        keep = H.numel() * 4 <= self.MAX_BYTES
        copy = H.float().clone() if keep else None
        work = H if overwrite and H.dtype == torch.float32 else H.float().clone()
        value = _factor(work, damp, act_order, device)
        if keep:
            self.key, self.hessian, self.value = key, copy, value
        return value


_FACTORS = _FactorCache()


def _inverse_cholesky(
    H: torch.Tensor, damp: float, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H' + damp·mean(diag H)·I)⁻¹``, ``H'`` the rows and
    columns of ``H`` in the order ``perm`` (as given without), column-major as LAPACK returns
    factors; ``H`` is destroyed. One Cholesky and one triangular inverse (⅔ n³ flops, half of
    Cholesky + ``cholesky_inverse`` + Cholesky): with ``J`` the reversal, ``J H' J = L Lᵀ``
    gives ``H'⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)``, and ``J L⁻¹ J`` is upper triangular with a positive
    diagonal, so it is that factor (unique). The reversal and ``perm`` are one gather."""
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))  # H += damp·mean(diag H)·I
    n = H.shape[0]
    if perm is None:
        flipped, spare = H.flip(0, 1), H
    else:
        rev = perm.flip(0).to(H.device)
        rows = H.index_select(0, rev)
        if H.is_contiguous():  # the second gather into H's storage (its values are used up)
            flipped, spare = torch.index_select(rows, 1, rev, out=H), rows
        else:
            flipped, spare = rows.index_select(1, rev), H
    # flipped is symmetric: its column-major view is the same matrix, so L⁻¹ is computed in
    # place in that layout (the one LAPACK returns), and U goes into the spare storage: two
    # n² matrices, and the factorization's quarter-size temporaries
    L = flipped.t()
    if not _cholesky_inverse_lower(L):
        raise HessianNotPositiveDefinite(
            f"the damped Hessian is not positive definite (damp {damp})"
        )
    if spare.is_contiguous():
        U = spare.as_strided((n, n), (1, n))
    else:
        U = torch.empty_strided((n, n), (1, n), dtype=L.dtype, device=L.device)
    return U.copy_(L.flip(0, 1))


CHOLESKY_BASE = 384  # LAPACK's Cholesky and triangular inverse up to this order


def _cholesky_inverse_lower(M: torch.Tensor) -> bool:
    """``M ← L⁻¹`` in place, ``L`` the lower Cholesky factor of the symmetric ``M`` (only its
    lower triangle is read; the upper one is zeroed); False when ``M`` is not positive
    definite. Above :data:`CHOLESKY_BASE` by halves, every step a matrix product (LAPACK's
    Cholesky and ``trtri`` are slow, poorly threaded at these orders): with
    ``M = [[A, ·], [B, C]]``, ``L₁₁ = chol A``, ``L₂₁ = B L₁₁⁻ᵀ``, ``L₂₂ = chol(C - L₂₁ L₂₁ᵀ)`` and
    ``L⁻¹ = [[L₁₁⁻¹, 0], [-L₂₂⁻¹ L₂₁ L₁₁⁻¹, L₂₂⁻¹]]``: about twice LAPACK's n³/3 + n³/3 flops
    (the triangular blocks are multiplied as full ones), at the matmul rate; ``B``-sized
    temporaries (two at most at a time)."""
    n = M.shape[0]
    if n <= CHOLESKY_BASE:
        info = torch.empty((), dtype=torch.int32, device=M.device)
        L = torch.empty_like(M)
        torch.linalg.cholesky_ex(M, out=(L, info))
        if int(info):
            return False
        eye = torch.eye(n, dtype=M.dtype, device=M.device)
        M.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return True
    h = n // 2
    A, B, C = M[:h, :h], M[h:, :h], M[h:, h:]
    if not _cholesky_inverse_lower(A):
        return False
    L21 = torch.mm(B, A.t())  # B L₁₁⁻ᵀ
    C.sub_(torch.mm(L21, L21.t()))
    if not _cholesky_inverse_lower(C):
        return False
    B.copy_(torch.mm(C, torch.mm(L21, A)).neg_())
    M[:h, h:].zero_()
    return True


def _quantize_columns(
    W: torch.Tensor, Hinv: torch.Tensor, grid: _Grid, block_size: int,
    static_scale: torch.Tensor | None, static_zero: torch.Tensor | None,
    native: bool | None = None,
):  # fmt: skip
    """Alg. 1: quantize column by column, spreading each error over the later columns; the rest
    of the matrix is updated once per block. Returns levels, scale, zero and the loss.

    The per-column step runs in the native kernel (:mod:`weightsmith.kernels.gptq`) when it is
    available and gives this machine's eager bits (checked once per process; ``native``
    forces either path), else in a few in-place torch ops per column. Both do the same
    arithmetic as the reference, so they give the same levels."""
    g, perm, dev = grid.g, grid.perm, W.device
    out_f, cols = W.shape
    Q = torch.zeros(out_f, cols, dtype=torch.int8, device=dev)
    n_groups = cols // g
    scale = torch.zeros(out_f, n_groups, device=dev) if static_scale is None else static_scale
    zero = torch.zeros(out_f, n_groups, device=dev) if static_zero is None else static_zero
    if native is None:
        # the kernel does torch's scalar addr_ arithmetic, which torch runs on Hinv's strided
        # (column-major, as LAPACK returns it) rows
        native = dev.type == "cpu" and Hinv.stride(1) != 1 and _native_ok()
    if native:  # the kernel reads them in place: contiguous float32 (same values)
        scale, zero = scale.float().contiguous(), zero.float().contiguous()
    loss = torch.zeros(out_f, device=dev)
    order = perm if perm is not None else torch.arange(cols, device=dev)
    groups = order // g  # the group of each (permuted) column
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.empty_like(W1)
        Err1 = torch.empty_like(W1)
        step = _BlockStep(W, W1, Hinv[i1:i2, i1:i2], Q1, Err1, scale, zero, grid, i1, i2)
        step.grp = groups[i1:i2].contiguous()
        i = 0
        while i < i2 - i1:  # one segment per group that starts here (or the block's rest)
            col = i1 + i
            end = i2 - i1
            if static_scale is None:
                step.qparams(i)
                end = min(end, i + g - col % g)
            if not (native and step.native(i, end)):
                step.eager(i, end)
            i = end
        Q[:, i1:i2] = Q1.to(torch.int8)
        loss += Err1.square().sum(1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update (Sec. 4, step 2)
    return Q, scale, zero, loss


@dataclass
class _BlockStep:
    """The columns of one block: the group qparams, and the per-column step (native/eager)."""

    W: torch.Tensor  # the whole (out, cols) matrix (its columns past the block: not yet seen)
    W1: torch.Tensor  # the block's columns (a copy, updated in place)
    Hinv1: torch.Tensor  # the block's (B, B) slice of the inverse-Hessian factor (a view)
    Q1: torch.Tensor
    Err1: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    grid: _Grid
    i1: int
    i2: int
    grp: torch.Tensor | None = None
    h1: torch.Tensor | None = None  # Hinv1 row-major, for the kernel

    def qparams(self, i: int) -> None:
        """At a group's first column (natural order): its qparams from the group's current,
        error-compensated weights (which may extend past the block)."""
        col, g, grid = self.i1 + i, self.grid.g, self.grid
        if col % g:
            return
        B = self.W1.shape[1]
        cur = (  # min/max only: the same values whether copied or not
            self.W1[:, i : i + g]
            if i + g <= B
            else torch.cat([self.W1[:, i:], self.W[:, self.i2 : self.i2 + g - (B - i)]], 1)
        )
        sc, z = _qparams_for(cur, grid.bits, grid.symmetric, grid.dtype, grid.zero_min, grid.ratios)
        self.scale[:, col // g], self.zero[:, col // g] = sc[:, 0], z[:, 0]

    def native(self, a: int, b: int) -> bool:
        qmin, qmax = level_range(self.grid.bits)
        if self.h1 is None:
            self.h1 = self.Hinv1.contiguous()
        return gptq_columns(self.W1, self.h1, self.scale, self.zero, self.grp, a, b,
                            qmin, qmax, self.Q1, self.Err1)  # fmt: skip

    def eager(self, a: int, b: int) -> None:
        """Columns ``[a, b)`` in a few in-place torch ops each (levels stay float within a
        block, the pivots are Python floats)."""
        qmin, qmax = level_range(self.grid.bits)
        W1, Q1, Err1, Hinv1 = self.W1, self.Q1, self.Err1, self.Hinv1
        pivots = Hinv1.diagonal().tolist()
        grps = self.grp.tolist()
        for i in range(a, b):
            s, z = self.scale[:, grps[i]], self.zero[:, grps[i]]
            x = W1[:, i]
            q = Q1[:, i]
            torch.div(x, s, out=q)
            q.round_().add_(z).clamp_(qmin, qmax)  # the levels, as float
            err = Err1[:, i]
            torch.sub(q, z, out=err)
            err.mul_(s)  # the dequantized column
            torch.sub(x, err, out=err)
            err.div_(pivots[i])
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)


_native_checked: bool | None = None


def _native_ok() -> bool:
    """Whether the native column kernel is available and gives the eager loop's bits here
    (checked once per process on small random problems: dynamic groups that cross blocks, and
    act-order's static groups; asymmetric)."""
    global _native_checked
    if _native_checked is None:
        _native_checked = False
        if gptq_kernels() is not None:
            _native_checked = all(_native_matches(act) for act in (False, True))
    return _native_checked


def _native_matches(act_order: bool) -> bool:
    gen = torch.Generator().manual_seed(7)
    rows, cols, g = 37, 96, 32
    w = torch.randn(rows, cols, generator=gen)
    x = torch.randn(4 * cols, cols, generator=gen)
    h = x.t() @ x
    perm = torch.randperm(cols, generator=gen) if act_order else None
    grid = _Grid(4, g, False, torch.float16, None, perm)
    results = []
    for native in (False, True):
        W, Hinv = w.clone(), _inverse_cholesky(h.clone(), 0.01)
        static = group_qparams(W, 4, g, False, torch.float16) if act_order else (None, None)
        out = _quantize_columns(W, Hinv, grid, 40, *static, native=native)
        results.append((*out[:3], W))
    return all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@dataclass(frozen=True)
class GPTQConfig(GridConfig, CalibratedConfig):
    """``--method gptq``: grid options, calibration text, and GPTQ's own settings."""

    damp: float = DEFAULT_DAMP  # fraction of mean(diag H) added to the diagonal
    act_order: bool = True  # by held-out measurement (docs/quantize.md, "Act-order")
    block_size: int = 128
    allow_rtn_fallback: bool = False  # RTN for a Linear whose Hessian has no Cholesky factor
    observer: str = DEFAULT_OBSERVER  # each group's qparams: minmax or mse (see mse.py)

    def validate(self) -> None:
        super().validate()
        if self.observer not in ("minmax", "mse"):
            raise ConfigError(f"--observer must be minmax or mse (got {self.observer!r})")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"--damp must be in [0, 1) (got {self.damp})")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be positive (got {self.block_size})")


@quant_method("gptq", config=GPTQConfig, statistic="hessian",
              summary="GPTQ, Hessian-compensated rounding")  # fmt: skip
def gptq_quantize(
    w: torch.Tensor, cfg: GPTQConfig, hessian: torch.Tensor | None = None, *,
    dtype: torch.dtype | None = None, zero_min: int | None = None,
    overwrite_hessian: bool = True,
) -> QuantizedWeight:  # fmt: skip
    """GPTQ with the settings of ``cfg`` (see :func:`gptq_quantize_weight`). The Hessian is
    handed over: its storage is reused (``overwrite_hessian=False`` keeps it)."""
    if hessian is None:
        raise ValueError("gptq needs the Hessian of the Linear's calibration inputs")
    return gptq_quantize_weight(
        w,
        hessian,
        bits=cfg.bits,
        group_size=cfg.group_size,
        symmetric=cfg.symmetric,
        damp=cfg.damp,
        act_order=cfg.act_order,
        block_size=cfg.block_size,
        dtype=dtype,
        zero_min=zero_min if zero_min is not None else zero_min_for(cfg),
        overwrite_hessian=overwrite_hessian,
        observer=cfg.observer,
    )
