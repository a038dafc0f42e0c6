"""The compute pool: merges give the same tensors on any number of threads, and the fixed
sub-chunk split does not depend on chunk boundaries."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from weightsmith.core.parallel import SUB_ELEMENTS, compute_pool, pipelined, pmap, sub_ranges
from weightsmith.merge.methods import TensorParams, merge_tensors
from weightsmith.merge.methods.dare import keep_mask


def test_sub_ranges_cut_at_absolute_multiples():
    assert sub_ranges(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert sub_ranges(3, 10, 4) == [(3, 4), (4, 8), (8, 10)]
    assert sub_ranges(4, 8, 4) == [(4, 8)]
    assert sub_ranges(5, 5, 4) == []


def test_pmap_keeps_order_and_restores_torch_threads():
    before = torch.get_num_threads()
    with compute_pool(2):
        assert torch.get_num_threads() == 1
        assert pmap(lambda x: x * x, list(range(20))) == [x * x for x in range(20)]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("method", "globals_", "model"),
    [
        ("ties", {"normalize": True, "lambda": 1.0}, {"weight": 1.0, "density": 0.4}),
        ("dare_ties", {"seed": 5}, {"weight": 0.7, "density": 0.5}),
        ("task_arithmetic", {}, {"weight": 0.5}),
    ],
)
def test_pool_results_equal_single_threaded(method, globals_, model):
    """3.5 sub-chunks per chunk and several chunks: every thread count gives identical bits."""
    g = torch.Generator().manual_seed(0)
    n = 3 * SUB_ELEMENTS + 12345
    base = torch.randn(n, generator=g)
    # bf16-like values: many exact ties in |δ|, the hard case for the top-k cut
    ms = [(base + 0.1 * torch.randn(n, generator=g)).bfloat16().float() for _ in range(2)]
    params = TensorParams("w", globals_, (model, model))
    single = merge_tensors(method, [base, *ms], params, chunk_size=SUB_ELEMENTS * 2 + 7)
    with compute_pool(3):
        pooled = merge_tensors(method, [base, *ms], params, chunk_size=SUB_ELEMENTS * 2 + 7)
    whole = merge_tensors(method, [base, *ms], params)
    assert torch.equal(single, pooled)
    assert torch.equal(single, whole)


def test_slerp_pool_equals_single_threaded():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 2 * SUB_ELEMENTS + 99, generator=g)
    single = merge_tensors("slerp", [a, b], t=0.3)
    with compute_pool(2):
        pooled = merge_tensors("slerp", [a, b], t=0.3, chunk_size=SUB_ELEMENTS + 5)
    assert torch.equal(single, pooled)


def test_dare_keep_mask_is_chunking_independent_and_has_the_density():
    whole = keep_mask(1234, 0, 300_000, 0.3)
    parts = torch.cat([keep_mask(1234, a, b - a, 0.3) for a, b in sub_ranges(0, 300_000, 7777)])
    assert torch.equal(whole, parts)
    # 300k Bernoulli(0.3) draws: sd of the mean is 8.4e-4, so 5 sd is 0.0042
    assert abs(whole.float().mean().item() - 0.3) < 0.0042


@pytest.mark.parametrize(("n", "span", "workers"), [(0, 4, 2), (10, 4, 1), (10, 4, 2), (37, 3, 2)])
def test_pipelined_feeds_every_span_in_order_after_its_fill(n, span, workers):
    """Each span is filled once, fed once, in order, only after its fill finished; at most
    two rounds are in flight (a buffer per span number modulo 4 × the threads is never
    overwritten before it is fed)."""
    filled, fed, log = set(), [], []
    lock = threading.Lock()

    def fill(s, e):
        time.sleep(0.001 * ((s * 7) % 3))  # finish out of order
        with lock:
            filled.add(s)
            log.append(("fill", s))

    def feed(s, e):
        with lock:
            assert s in filled
            fed.append((s, e))
            log.append(("feed", s))

    with compute_pool(workers):
        pipelined(n, span, fill, feed)
    assert fed == [(s, min(n, s + span)) for s in range(0, n, span)]
    slots = 4 * workers
    for i, (kind, s) in enumerate(log):
        if kind == "fill":  # the span that last used this slot was fed before
            older = s - slots * span
            assert older < 0 or ("feed", older) in log[:i]
