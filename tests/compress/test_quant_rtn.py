"""RTN qparams, rounding and int32 packing against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from weightsmith.compress.packing import (
    pack_int32,
    pack_rows_gptq,
    unpack_int32,
    unpack_rows_gptq,
)
from weightsmith.compress.registry import QuantConfig
from weightsmith.compress.rtn import dequantize, rtn_quantize


def test_symmetric_4bit_hand_example():
    # absmax 1.5 -> scale 2*1.5/15 = 0.2; levels round(w/0.2) = [-7.5->-8 (half to even), 4, 2, 0]
    w = torch.tensor([[-1.5, 0.75, 0.3, 0.0]])
    qw = rtn_quantize(w, QuantConfig(bits=4, group_size=-1, symmetric=True))
    assert qw.q.tolist() == [[-8, 4, 2, 0]]
    assert qw.scale.item() == pytest.approx(0.2)
    assert qw.zero.tolist() == [[0]]
    torch.testing.assert_close(qw.dequantize(), torch.tensor([[-1.6, 0.8, 0.4, 0.0]]))


def test_asymmetric_4bit_hand_example():
    # range [0, 3.5] (0 always included): scale 3.5/15, zero round(-8 - 0/scale) = -8
    w = torch.tensor([[0.5, 1.0, 2.0, 3.5]])
    qw = rtn_quantize(w, QuantConfig(bits=4, group_size=-1, symmetric=False))
    s = 3.5 / 15
    assert qw.zero.tolist() == [[-8]]
    assert qw.q.tolist() == [[-6, -4, 1, 7]]
    torch.testing.assert_close(
        qw.dequantize(), torch.tensor([[2 * s, 4 * s, 9 * s, 15 * s]]), atol=1e-6, rtol=0
    )


def test_group_wise_uses_one_scale_per_group():
    w = torch.tensor([[1.0, -0.5, 100.0, 50.0]])
    qw = rtn_quantize(w, QuantConfig(bits=8, group_size=2, symmetric=True))
    assert qw.scale.shape == (1, 2)
    torch.testing.assert_close(qw.scale[0], torch.tensor([2 / 255, 200 / 255]))
    assert qw.q.tolist() == [[127, -64, 127, 64]]  # 0.5/(2/255)=63.75 -> 64


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_error_is_at_most_half_a_step(bits, group_size, sym):
    torch.manual_seed(bits)
    w = torch.randn(24, 64)
    qw = rtn_quantize(w, QuantConfig(bits=bits, group_size=group_size, symmetric=sym))
    err = (qw.dequantize() - w).abs()
    step = qw.scale[:, torch.arange(64) // qw.group_size]
    # min-max covers every value; symmetric clips +absmax by at most one step
    bound = step * (1.0 if sym else 0.5) + 1e-6
    assert bool((err <= bound).all())
    assert int(qw.q.min()) >= -(1 << (bits - 1)) and int(qw.q.max()) <= (1 << (bits - 1)) - 1


def test_8bit_sqnr_above_40db():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    deq = rtn_quantize(w, QuantConfig(bits=8, group_size=32)).dequantize()
    sqnr = 10 * torch.log10(w.pow(2).sum() / (w - deq).pow(2).sum())
    assert sqnr > 40


def test_dequantize_follows_g_idx():
    q = torch.tensor([[1, 2, 3, 4]], dtype=torch.int8)
    scale = torch.tensor([[1.0, 10.0]])
    zero = torch.zeros(1, 2)
    g_idx = torch.tensor([1, 0, 1, 0])
    assert dequantize(q, scale, zero, 2, g_idx).tolist() == [[10.0, 2.0, 30.0, 4.0]]


def test_pack_4bit_hand_example():
    # signed levels -> unsigned (+8): [0, 7, 8, 15, 9, 10, 11, 5], element i at bits 4i..4i+3
    q = torch.tensor([[-8, -1, 0, 7, 1, 2, 3, -3]], dtype=torch.int8)
    word = 0x5BA9F870  # nibbles from the top: 5, 11, 10, 9, 15, 8, 7, 0
    assert pack_int32(q, 4).tolist() == [[word]]
    top = torch.tensor([[-8] * 7 + [7]], dtype=torch.int8)  # 0xF0000000 as int32
    assert pack_int32(top, 4).tolist() == [[0xF0000000 - (1 << 32)]]
    assert unpack_int32(pack_int32(q, 4), 4, 8).tolist() == q.tolist()


def test_pack_3bit_straddles_words():
    # 11 values x 3 bits = 33 bits: element 10 sits at bits 30..32, across two words
    q = torch.full((1, 11), -4, dtype=torch.int8)  # unsigned 0
    q[0, 10] = 1  # unsigned 5 = 0b101: bit 30 of word 0 and bit 0 of word 1
    assert pack_int32(q, 3).tolist() == [[1 << 30, 1]]
    ones = torch.full((1, 11), 3, dtype=torch.int8)  # unsigned 7 = 0b111 everywhere
    assert pack_int32(ones, 3).tolist() == [[-1, 1]]
    assert unpack_int32(pack_int32(q, 3), 3, 11).tolist() == q.tolist()


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_matches_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    torch.manual_seed(bits)
    for cols in (5, 32, 70):
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, cols), dtype=torch.int8)
        for dim in (0, 1):
            x = q if dim == 1 else q.t().contiguous()
            assert torch.equal(pack_int32(x, bits, dim), helpers.pack_to_int32(x, bits, dim))
            assert torch.equal(unpack_int32(pack_int32(x, bits, dim), bits, cols, dim), x)


def test_gptq_row_packing_hand_example():
    # 8 four-bit values down dim 0 -> one int32 per column, value j at bits 4j
    u = torch.arange(8).view(8, 1)
    assert pack_rows_gptq(u, 4, dim=0).tolist() == [[0x76543210]]
    assert unpack_rows_gptq(pack_rows_gptq(u, 4, 0), 4, 0).tolist() == u.tolist()
    z = torch.tensor([[15, 0, 0, 0, 0, 0, 0, 1]])  # along dim 1 (qzeros)
    assert pack_rows_gptq(z, 4, dim=1).tolist() == [[0x1000000F]]
