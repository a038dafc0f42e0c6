"""Pure mask functions: which entries of a weight to zero, given importance scores.

Every function takes scores shaped like the weight, ``(out, in)``, and returns a boolean mask
of the same shape, ``True`` where the weight is pruned. Ties are broken towards the lower
index (a stable sort), so masks are deterministic.

Conventions follow locuslab/wanda ``lib/prune.py``: unstructured Wanda prunes the
``int(in * sparsity)`` lowest scores of every output row; unstructured magnitude compares the
whole matrix; N:M zeroes the N lowest of every M consecutive inputs of each row.
"""

from __future__ import annotations

import math

import torch


def count_to_prune(n: int, sparsity: float) -> int:
    """``floor(n * sparsity)``, robust to float error (0.29 * 100 is 28.999999999999996)."""
    return math.floor(n * sparsity + 1e-9)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(in * sparsity)`` lowest scores of each output row."""
    k = count_to_prune(scores.shape[1], sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, True)
    return mask


def tensor_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(numel * sparsity)`` lowest scores of the whole matrix."""
    k = count_to_prune(scores.numel(), sparsity)
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        flat[torch.sort(scores.reshape(-1), stable=True).indices[:k]] = True
    return flat.view(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest of every block of ``m`` consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not divisible by M={m}")
    blocks = scores.reshape(rows, cols // m, m)
    idx = torch.sort(blocks, dim=-1, stable=True).indices[..., :n]
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.view(rows, cols)


def prune_mask(
    scores: torch.Tensor,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    compare: str = "row",
) -> torch.Tensor:
    """The mask a method asks for: N:M when ``pattern`` is given, else unstructured with the
    method's comparison group (``row`` or ``tensor``)."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    if sparsity is None:
        raise ValueError("give sparsity or pattern")
    return row_mask(scores, sparsity) if compare == "row" else tensor_mask(scores, sparsity)


def check_sparsity(
    w: torch.Tensor,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    compare: str = "row",
) -> int:
    """Verify a pruned ``(out, in)`` weight has at least the zeros asked for (per row, per
    N:M block, or per matrix); returns its number of zeros. Raises ``ValueError`` otherwise."""
    zero = w == 0
    if pattern is not None:
        n, m = pattern
        per_block = zero.reshape(w.shape[0], -1, m).sum(-1)
        bad = (per_block < n).nonzero()
        if bad.numel():
            r, b = bad[0].tolist()
            raise ValueError(f"row {r}, block {b}: {per_block[r, b].item()} zeros < {n} of {m}")
    elif compare == "row":
        need = count_to_prune(w.shape[1], sparsity or 0.0)
        per_row = zero.sum(1)
        bad = (per_row < need).nonzero()
        if bad.numel():
            r = bad[0].item()
            raise ValueError(f"row {r}: {per_row[r].item()} zeros < {need}")
    else:
        need = count_to_prune(w.numel(), sparsity or 0.0)
        if zero.sum().item() < need:
            raise ValueError(f"{zero.sum().item()} zeros < {need}")
    return int(zero.sum().item())
