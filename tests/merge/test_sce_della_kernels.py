"""The native bfloat16 SCE / DARE / DELLA paths (stream_stored) against the torch narrow path.

SCE and DARE give the torch path's bits (the torch path is mergekit's ops, see
test_mergekit_parity_bf16_masked.py); DELLA draws its own masks, so its keep decisions are
checked by distribution (keep rate by |δ| rank, within 4σ) and by determinism.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import weightsmith.kernels as kernels
import weightsmith.merge.methods.base as base_module
from weightsmith.kernels import merge_narrow
from weightsmith.merge.methods.base import (
    TensorChunks,
    TensorParams,
    get_method,
    run_method,
    with_defaults,
)
from weightsmith.merge.methods.della import rank_probabilities

pytestmark = pytest.mark.skipif(kernels.merge_kernels() is None, reason="no C compiler here")
BF16 = torch.bfloat16


class Stored(TensorChunks):
    """In-memory inputs that also hand out their stored (bfloat16/float32) tensors."""

    def __init__(self, tensors: list[torch.Tensor], chunk: int = 7_919) -> None:
        super().__init__(tensors, "t", chunk_size=chunk)
        self.store = [t.reshape(-1).contiguous() for t in tensors]

    @contextlib.contextmanager
    def stored(self, i: int):
        yield self.store[i]


def inputs(k: int, shape: tuple[int, ...], seed: int, dtype=BF16, ties=False) -> list:
    """A base and k fine-tunes: task vectors of widely spread magnitudes (ties: a few levels,
    so many equal variances / magnitudes), exact zeros of both signs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    out = [base]
    for _ in range(k):
        if ties:
            d = torch.randint(-3, 4, shape, generator=g).float() * 2.0**-9
        else:
            d = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 3)
            d *= 1e-3
        x = base + d
        r = torch.rand(shape, generator=g)
        x[r < 0.03] = base[r < 0.03]
        x[(r >= 0.03) & (r < 0.05)] = -0.0
        out.append(x)
    return [t.to(dtype) for t in out]


def both(method: str, ts: list, globals_: dict, model: dict, out_dtype=BF16):
    """(torch narrow path, native path) outputs, flat."""
    m = get_method(method)
    p = TensorParams("t", globals_, tuple(dict(model) for _ in ts[1:]), compute_dtype=BF16)
    p = with_defaults(m, p, len(ts))
    ref = torch.cat(list(run_method(m, Stored(ts), p))).to(out_dtype)
    fast = m.stream_stored(Stored(ts), p, out_dtype)
    assert fast is not None
    return ref, torch.cat(list(fast))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.view(torch.int16 if a.itemsize == 2 else torch.int32),
        b.view(torch.int16 if b.itemsize == 2 else torch.int32),
    )


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("topk", [0.5, 0.1, 1.0])
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_sce_native_gives_the_torch_narrow_bits(k, ties, topk, dtype):
    ts = inputs(k, (211, 173), k + 7 * ties, dtype, ties)
    ref, fast = both("sce", ts, {"select_topk": topk}, {})
    assert same_bits(ref, fast)


def test_sce_variance_kernel_is_torch_var_on_extreme_values():
    """Welford in float64 rounded through float32 to bfloat16, as torch.var on a bfloat16
    stack: the same bits also for task vectors of very different exponents and subnormals."""
    g = torch.Generator().manual_seed(3)
    n = 100_003
    base = torch.randn(n, generator=g)
    xs = []
    for k in range(3):
        e = torch.randint(-130, 120, (n,), generator=g).float()
        xs.append(torch.randn(n, generator=g) * torch.pow(2.0, e) * 0.5 ** (k * 3))
    ts = [t.to(BF16) for t in [base, *xs]]
    want = torch.var(torch.stack([x - ts[0] for x in ts[1:]]), dim=0, unbiased=False)
    got = torch.empty(n, dtype=BF16)
    assert merge_narrow.sce_var(ts, got) == [0, 0, 0, 0]
    assert same_bits(got, want)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize(
    "globals_",
    [{}, {"rescale": False}, {"normalize": True, "lambda": 0.7}, {"seed": 5, "normalize": True}],
)
@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_dare_native_gives_the_torch_narrow_bits(method, globals_, dtype, monkeypatch):
    """Same bits as the torch path with its whole-tensor sums on one thread. The native L1
    rescale norms are float64 sums rounded once; torch's float32 sums depend on its thread
    count, so with more threads the two factors can differ by one bfloat16 ulp at a rounding
    boundary (seen with seed 5 at 2 threads) — acceptable for a randomised method, which
    matches mergekit by distribution only (docs/merge.md)."""
    monkeypatch.setattr(base_module, "TORCH_THREADS", 1)
    ts = inputs(3, (97, 1031), 11, dtype)
    ref, fast = both(method, ts, globals_, {"weight": 0.7, "density": 0.3})
    assert same_bits(ref, fast)
    ref, fast = both(method, ts, globals_, {"weight": 1.0, "density": 1.0}, torch.float32)
    assert same_bits(ref, fast)


def test_della_keep_rate_follows_the_rank_probabilities():
    """density 0.5, epsilon 0.3 on 400 rows of 1000: the keep rate of each tenth of the ranks
    is the mean of its bfloat16 probabilities (± 4σ over 40k draws); rows are independent of
    the block they are computed in; another seed gives another mask."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(400, 1000, generator=g).to(BF16)
    x = (base.float() + torch.randn(400, 1000, generator=g) * 0.01).to(BF16)
    delta = (x - base).float()
    probs = rank_probabilities(1000, 0.5, 0.3, BF16)
    cuts = (probs * 2.0**32).round().to(torch.int64)
    keep = torch.empty(400 * 1000, dtype=torch.bool)
    assert merge_narrow.della_keep(base.view(-1), x.view(-1), 1000, 0, 9, cuts, keep)
    keep = keep.view(400, 1000)
    rank = delta.abs().argsort(dim=1, stable=True).argsort(dim=1)
    for lo in range(0, 1000, 100):
        sel = keep[(rank >= lo) & (rank < lo + 100)].float()
        expected = float(probs[lo : lo + 100].mean())
        assert abs(float(sel.mean()) - expected) < 4 * math.sqrt(0.25 / sel.numel())
    part = torch.empty(100 * 1000, dtype=torch.bool)
    rows = slice(200, 300)
    b2, x2 = base[rows].reshape(-1), x[rows].reshape(-1)
    assert merge_narrow.della_keep(b2, x2, 1000, 200, 9, cuts, part)
    assert torch.equal(part.view(100, 1000), keep[rows])
    other = torch.empty(400 * 1000, dtype=torch.bool)
    assert merge_narrow.della_keep(base.view(-1), x.view(-1), 1000, 0, 10, cuts, other)
    assert not torch.equal(other.view(400, 1000), keep)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(300, 2048), (97, 1031), (5000,)])
def test_della_native_gives_the_torch_narrow_bits(method, shape, monkeypatch):
    """The torch narrow path (what a CUDA device runs) draws the native kernel's SplitMix64
    per entry, so it keeps the same entries: the same bits (whole-tensor sums on one thread,
    as for DARE above); the same bytes twice for one seed, another mask for another seed."""
    monkeypatch.setattr(base_module, "TORCH_THREADS", 1)
    ts = inputs(2, shape, 2)
    model = {"weight": 1.0, "density": 0.5, "epsilon": 0.15}
    ref, fast = both(method, ts, {}, model)
    assert same_bits(ref, fast)
    _, again = both(method, ts, {}, model)
    assert same_bits(fast, again)
    _, other = both(method, ts, {"seed": 1}, model)
    assert not same_bits(fast, other)


def test_disabled_kernels_fall_back_to_torch(monkeypatch):
    """WEIGHTSMITH_KERNELS=0: no native path (stream_stored None), the torch path runs."""
    monkeypatch.setenv("WEIGHTSMITH_KERNELS", "0")
    ts = inputs(2, (50, 64), 1)
    for method, model in (
        ("sce", {}),
        ("dare_ties", {"weight": 1.0, "density": 0.5}),
        ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    ):
        m = get_method(method)
        p = with_defaults(
            m, TensorParams("t", {}, tuple(dict(model) for _ in ts[1:]), compute_dtype=BF16), 3
        )
        assert m.stream_stored(Stored(ts), p, BF16) is None


@pytest.mark.parametrize("n", [4, 5, 33, 1000, 100_003])
@pytest.mark.parametrize("levels", [1, 3, 50, None])
@pytest.mark.parametrize("order", ["random", "ascending", "descending", "organ pipe"])
def test_topk_mask_picks_torchs_entries_among_ties(n, levels, order):
    """ws_topk_mask (libstdc++'s nth_element replayed on indices) selects exactly the set
    torch.topk selects, also among many equal values and on orders that push introselect
    to its worst cases, into a given mask (not zeroed) or over the values' storage; k·64 <= n
    is torch's partial_sort case, left to torch."""
    g = torch.Generator().manual_seed(n)
    if levels is None:
        v = torch.randn(n, generator=g)
    else:
        v = torch.randint(0, levels, (n,), generator=g).float() * 0.01
    v = v.to(BF16)
    if order != "random":
        s = v.sort(descending=order == "descending").values
        v = torch.cat([s[::2], s[1::2].flip(0)]) if order == "organ pipe" else s
    v = v.contiguous()
    for k in {1, n // 50 + 1, n // 3 + 1, n // 2, n - 1, n} - {0}:
        got = torch.ones(n, dtype=torch.bool)  # the kernel clears the mask itself
        if merge_narrow.topk_mask(v, k, got) is None:
            assert k * 64 <= n
            continue
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.topk(v.abs(), k, largest=True, sorted=False).indices] = True
        assert torch.equal(got, want), k
        # written over the values' own storage: the same set, no second buffer
        own = v.clone()
        over = merge_narrow.topk_mask(own, k)
        assert over.data_ptr() == own.data_ptr() and torch.equal(over, want), k


def test_small_and_one_entry_tensors_match_the_torch_path():
    """A 1-entry and a 3-entry tensor (one DELLA row of one entry is kept with p = density)
    run natively with the torch path's bits for sce and DARE."""
    for shape in ((1,), (3,), (1, 5)):
        ts = inputs(2, shape, 3)
        ref, fast = both("sce", ts, {"select_topk": 0.5}, {})
        assert same_bits(ref, fast)
        ref, fast = both("dare_ties", ts, {}, {"weight": 1.0, "density": 0.5})
        assert same_bits(ref, fast)
        _, fast = both("della", ts, {}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1})
        assert fast.numel() == ts[0].numel()
