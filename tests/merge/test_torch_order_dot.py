"""torch.dot and the float32 norm of bfloat16 vectors, natively in torch's order
(weightsmith.kernels.dot): the order's rules on hand values, the probe arithmetic on simulated
chunkings, and torch's own bits on this machine at the lengths the Karcher merge meets."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from weightsmith.core.parallel import compute_pool, pmap
from weightsmith.kernels import dot

pytestmark = pytest.mark.skipif(dot.library() is None, reason="no C compiler here")

BF16 = torch.bfloat16


def amx_here() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_bf16" in flags and torch.backends.mkldnn.is_available()


def native_total(x: list[float], y: list[float], cg: int) -> float:
    a, b = torch.tensor(x).to(BF16), torch.tensor(y).to(BF16)
    return float(dot.dots_with(a, [b], cg)[0].float())


def test_group_sum_is_even_chain_plus_odd_chain():
    # p0 = 2^24, p1 = 1, p2 = 1, p3 = -2^24 ... in one group: (2^24 + 1) loses the 1 on the even
    # chain, (1 - 2^24) keeps it exactly; the even + odd sum is then 2^24 + 1 - 2^24 = 1 (not 2,
    # what the exact sum or an in-order chain 2^24 + 1 + 1 - 2^24 = 2^24 - 2^24 = 0 would give)
    x = [2.0**24, 1.0, 1.0, -(2.0**24)] + [0.0] * 28
    y = [1.0] * 32
    assert native_total(x, y, 1) == 1.0


def test_groups_chain_within_a_chunk_and_chunks_restart_from_zero():
    # four groups with sums 2^24, 1, 1, -2^24 (1 is lost against 2^24: a tie, to even):
    # one chunk or chunks of one group: ((2^24 + 1) + 1) - 2^24 = 0; chunks of two groups:
    # (2^24 + 1) = 2^24 and (1 - 2^24) = -(2^24 - 1) exactly, whose total is 1
    def groups(*vals: float) -> list[float]:
        return [v for val in vals for v in [val] + [0.0] * 31]

    x, ones = groups(2.0**24, 1.0, 1.0, -(2.0**24)), [1.0] * 128
    assert native_total(x, ones, 4) == 0.0
    assert native_total(x, ones, 1) == 0.0
    assert native_total(x, ones, 2) == 1.0
    # the last group is padded with zeros: 33 entries are two groups
    assert native_total([1.0] * 33, [1.0] * 33, 1) == 33.0


@pytest.mark.skipif(not dot.library().ws_dot_has_ftz(), reason="no x86 flush-to-zero control")
def test_denormals_flush_to_zero():
    tiny = 2.0**-70  # normal bfloat16, its square 2^-140 a float32 denormal
    assert native_total([tiny, 0.0], [tiny, 0.0], 1) == 0.0
    assert native_total([2.0**-130], [1.0], 1) == 0.0  # a denormal input counts as zero
    # 1.5·2^-126 - 2^-126 = 2^-127, a denormal sum: zero
    assert native_total([1.5 * 2.0**-100, 0.0, -(2.0**-100)], [2.0**-26] * 3, 1) == 0.0


def simulated_probe(starts: list[int]):
    """probe(x, ones) for a chunking whose chunks start at ``starts``: the ones at or after the
    start of x's chunk are lost."""

    def probe(x: int, ones: list[int]) -> int:
        start = max(s for s in starts if s <= x)
        return sum(1 for g in ones if g >= start)

    return probe


@pytest.mark.parametrize(
    ("starts", "x", "want"),
    [
        ([0], 10, 0),
        ([0, 6250, 12500], 18748, 12500),
        ([0, 6250, 12500], 9000, 6250),
        ([0, *range(8192, 2_048_000, 8192)], 2_047_998, 2_039_808),
        ([0, 1, 2, 3], 3, 3),
        ([0, 700_001], 700_003, 700_001),
    ],
)
def test_chunk_start_narrows_to_the_exact_group(starts, x, want):
    calls = []

    def probe(xx, ones):
        assert len(ones) <= 255 and all(g < xx for g in ones)
        calls.append(1)
        return simulated_probe(starts)(xx, ones)

    assert dot._chunk_start(probe, x) == want
    assert len(calls) <= 4  # 255-fold per probe


def test_equal_chunkings_put_onednns_split_first():
    # 600000 entries = 18750 groups; the last chunk starting at 12500 fits cg 6250 (3 chunks,
    # oneDNN's ceil(K / 3)) and cg 12500 (2 chunks: the last one 6250 <= 12500)
    assert dot._equal_chunkings(600_000, 12_500) == [6250, 12500]
    # 2^22 entries = 131072 groups, last chunk at 122880: cg 8192 (16 chunks) first
    got = dot._equal_chunkings(1 << 22, 122_880)
    assert got[0] == 8192 and 122_880 in got


def test_adversarial_pair_cancels_exactly():
    x, y = dot.adversarial_pair(10_001, 3)
    assert float((x.double() * y.double()).sum()) == 0.0
    assert (x != 0).sum() >= 10_000


@pytest.mark.parametrize("n", [1, 31, 4096, 4097, 100_003])
def test_norm_matches_torch(n):
    if dot.norm_lanes() is None:
        pytest.skip("torch's float32 norm order is not reproduced on this CPU")
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 0.03).to(BF16)
    assert dot.norm(x) == float(torch.linalg.vector_norm(x.to(torch.float32)))


def test_norm_fed_in_spans_of_any_length():
    if dot.norm_lanes() is None:
        pytest.skip("torch's float32 norm order is not reproduced on this CPU")
    x = (torch.randn(50_021, generator=torch.Generator().manual_seed(3)) * 0.1).to(BF16)
    feed, at = dot.NormFeed(x.numel()), 0
    for span in [1, 7, 16, 3, 1000, 8, 9, 20_000, 29_000, 10_000]:
        feed.feed(x[at : at + span])
        at += span
    assert at > x.numel() - 16 or at == x.numel()
    feed.feed(x[at:])
    assert feed.result() == float(torch.linalg.vector_norm(x.to(torch.float32)))


LENGTHS = [4097, 5001, 65_537, 524_288, 524_320, 1_000_003, 2_097_152, 4_194_304]


@pytest.mark.parametrize("threads", [1, 2])
def test_dots_give_torchs_bits(threads):
    """Every length the 1.1B Llama has past 4096 entries (and awkward ones), random and
    adversarial vectors, one and two torch threads, on the pool and off it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n in LENGTHS:
            g = torch.Generator().manual_seed(n)
            m = (torch.randn(n, generator=g) * 1e-3).to(BF16)
            us = [(torch.randn(n, generator=g) * 1e-3).to(BF16) for _ in range(3)]
            x, y = dot.adversarial_pair(n, 77)
            want = [torch.dot(m, u) for u in us] + [torch.dot(x, y)]
            with compute_pool(2):
                got = (dot.dots(m, us, run=pmap) or []) + (dot.dots(x, [y], run=pmap) or [])
            if not amx_here() and not got:
                continue  # another machine: torch keeps the dot
            assert dot.chunk_groups(n) is not None, f"no order found for {n} on an AMX machine"
            assert len(got) == 4
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), n
    finally:
        torch.set_num_threads(saved)


def test_short_or_foreign_inputs_keep_torch():
    assert dot.dots(torch.ones(4096, dtype=BF16), [torch.ones(4096, dtype=BF16)]) is None
    assert dot.dots(torch.ones(5000), [torch.ones(5000)]) is None  # float32
    a = torch.ones(10_000, dtype=BF16)
    assert dot.dots(a, [torch.ones(9_999, dtype=BF16)]) is None
    assert dot.dots(a[::2], [a[::2]]) is None  # not contiguous


def test_the_kernel_takes_what_the_wrapper_passes():
    lib = dot.library()
    assert isinstance(lib.ws_dot_max_units(), int) and lib.ws_dot_max_units() >= 3
    assert ctypes.sizeof(ctypes.c_float) == 4
