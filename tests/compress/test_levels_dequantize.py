"""``dequantize`` in natural group order broadcasts the qparams over each group; it must give
the per-column gather's bits exactly (the same float ops), and g_idx still reorders."""

from __future__ import annotations

import pytest
import torch

from weightsmith.compress.levels import dequantize


@pytest.mark.parametrize("rows,cols,g", [(7, 96, 32), (5, 64, 64), (3, 40, 8)])
def test_broadcast_dequantize_is_the_gather_bitwise(rows, cols, g):
    gen = torch.Generator().manual_seed(rows + cols)
    q = torch.randint(-8, 8, (rows, cols), generator=gen, dtype=torch.int8)
    scale = (torch.rand(rows, cols // g, generator=gen) + 0.01).to(torch.bfloat16)
    zero = torch.randint(-3, 3, (rows, cols // g), generator=gen, dtype=torch.int8)
    idx = torch.arange(cols) // g
    want = (q.float() - zero[:, idx].float()) * scale[:, idx].float()
    assert torch.equal(dequantize(q, scale, zero, g), want)
    assert torch.equal(dequantize(q, scale, zero, g, idx.int()), want)  # the gather path
    perm = torch.randperm(cols, generator=gen)
    got = dequantize(q, scale, zero, g, idx[perm].int())  # act-order g_idx: per column
    assert torch.equal(got, (q.float() - zero[:, idx[perm]].float()) * scale[:, idx[perm]].float())
    assert torch.equal(got, want) == (cols == g)  # one group: no reordering to see
