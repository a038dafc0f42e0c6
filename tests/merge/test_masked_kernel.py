"""The native masked bfloat16 task arithmetic (``ws_narrow_gta`` with keep masks: TIES /
breadcrumbs in mergekit's dtype) gives the bits of mergekit's torch ops, written out here as mergekit 0.1.5's
``generalized_task_arithmetic`` runs them: task vectors in bfloat16, masked, rescaled,
weighted, sign election, sums, divisor, λ, + base."""

from __future__ import annotations

import pytest
import torch

from weightsmith.kernels import merge as merge_native
from weightsmith.kernels import merge_narrow
from weightsmith.kernels.merge_narrow import Drop

pytestmark = pytest.mark.skipif(not merge_native.available(), reason="no C compiler here")

BF16 = torch.bfloat16
N = 50_021  # not a multiple of any vector width


def edge_inputs(k: int, seed: int) -> list[torch.Tensor]:
    """base + k models: close values (cancellation), ±0, subnormals, values near bfloat16's max
    (sums overflow), repeated values (ties), equal to the base (δ = 0)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=g)
    out = [base]
    for i in range(k):
        x = base + torch.randn(N, generator=g) * 0.01 * (i + 1)
        r = torch.rand(N, generator=g)
        x[r < 0.05] = 0.0
        x[(r >= 0.05) & (r < 0.08)] = -0.0
        x[(r >= 0.08) & (r < 0.10)] = 1e-39 * (i - 1.5)
        x[(r >= 0.10) & (r < 0.11)] = 3e38 * (1 if i % 2 else -1)
        x[(r >= 0.11) & (r < 0.13)] = 0.0078125
        x[(r >= 0.13) & (r < 0.16)] = base[(r >= 0.13) & (r < 0.16)]
        out.append(x)
    return out


def mergekit_masked(xs, masks, scales, weights, consensus, normalize, lam):
    """mergekit's ops on whole bfloat16 tensors."""
    base = xs[0].to(BF16)
    deltas = []
    for x, m, s in zip(xs[1:], masks, scales, strict=True):
        d = x.to(BF16) - base
        if m is not None:
            d = d * m.to(BF16)
        if s is not None:
            d = d * torch.tensor(s, dtype=BF16)
        deltas.append(d)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights, dtype=BF16).view(-1, 1)
    deltas = deltas * w
    if consensus:
        majority = (deltas.sum(dim=0) >= 0).to(BF16) * 2 - 1
        agree = deltas.sign() == majority
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed


CASES = [
    # k, consensus, normalize, lam, weights, with masks, with scales
    (1, True, True, 1.0, [1.0], True, False),
    (2, True, True, 1.0, [1.0, 1.0], True, False),
    (2, True, False, 0.7, [0.3, -0.9], True, True),
    (3, True, True, 1.3, [0.5, 0.25, 1.7], True, False),
    (2, False, False, 1.0, [1.0, 1.0], True, False),
    (3, False, True, 0.5, [0.3, 0.3, -0.6], True, True),  # weights sum to 0: divisor 1
    (4, False, True, 1.0, [0.1, 0.2, 0.3, 0.4], False, False),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("out_dtype", [torch.float32, BF16])
def test_native_masked_matches_mergekit_ops(case, dtype, out_dtype):
    k, consensus, normalize, lam, weights, with_masks, with_scales = case
    xs = edge_inputs(k, seed=k + 10 * consensus)
    g = torch.Generator().manual_seed(7)
    masks = [torch.rand(N, generator=g) < 0.5 if with_masks else None for _ in range(k)]
    if with_masks:
        masks[0] = None  # a task vector kept whole next to masked ones
    scales = [
        float(torch.tensor(1.0 + 0.37 * i, dtype=BF16)) if with_scales else None for i in range(k)
    ]
    want = mergekit_masked(xs, masks, scales, weights, consensus, normalize, lam).to(out_dtype)
    w_bf16 = torch.tensor(weights, dtype=BF16).float().tolist()
    inputs = [x.to(dtype) for x in xs]
    out = torch.empty(N, dtype=out_dtype)
    res = merge_narrow.narrow_gta(
        inputs,
        0,
        [Drop(mask=m, scale=s) for m, s in zip(masks, scales, strict=True)],
        w_bf16,
        consensus=consensus,
        normalize=normalize,
        total=float(mergekit_divisor(weights)),
        lam=None if lam == 1 else lam,
        out=out,
    )
    assert res is not None
    bad_out, bad_in = res
    assert bad_in == [0] * (k + 1)
    assert bad_out == int((~torch.isfinite(want)).sum())
    same = (out.view(torch.int16 if out_dtype == BF16 else torch.int32)) == (
        want.view(torch.int16 if out_dtype == BF16 else torch.int32)
    )
    assert bool(same.all()), f"{int((~same).sum())} entries differ"


def mergekit_divisor(weights: list[float]) -> torch.Tensor:
    divisor = torch.tensor(weights, dtype=BF16).sum(dim=0)
    return torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)


def test_input_nan_is_counted_per_input():
    xs = edge_inputs(2, seed=1)
    xs[2][17] = float("nan")
    out = torch.empty(N, dtype=BF16)
    res = merge_narrow.narrow_gta(
        [x.to(BF16) for x in xs],
        0,
        [Drop(), Drop()],
        [1.0, 1.0],
        consensus=True,
        normalize=True,
        total=2.0,
        lam=None,
        out=out,
    )
    assert res is not None and res[1] == [0, 0, 1]
