"""``bf16_round_arith`` (bf16.h), the rounding of the spherical merges' stage loops: the bits of
``bf16_round`` for every value that is not a NaN, and a NaN stays a NaN whenever its low 16 bits
are zero (the only NaNs those loops can see), so what they store is unchanged; a NaN with low
bits set is where it would differ (why loads keep ``bf16_round``)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

import weightsmith.kernels as kernels

HEADER = Path(kernels.__file__).with_name("bf16.h")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    src = tmp_path_factory.mktemp("round") / "round_test.c"
    src.write_text(
        f'#include "{HEADER}"\n'
        "int round_test_abi(void) { return 1; }\n"
        "void both(const uint32_t *in, int64_t n, uint32_t *exact, uint32_t *arith) {\n"
        "    for (int64_t i = 0; i < n; i++) {\n"
        "        float f, e, a; memcpy(&f, in + i, 4);\n"
        "        e = bf16_round(f); a = bf16_round_arith(f);\n"
        "        memcpy(exact + i, &e, 4); memcpy(arith + i, &a, 4);\n"
        "    }\n"
        "}\n"
    )
    p = ctypes.c_void_p
    got = kernels.load_library(
        "round_test", src, {"both": ([p, ctypes.c_int64, p, p], None)}, ("round_test_abi", 1)
    )
    if got is None:
        pytest.skip("no C compiler here")
    return got


def rounded(lib, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    exact, arith = torch.empty_like(bits), torch.empty_like(bits)
    lib.both(bits.data_ptr(), bits.numel(), exact.data_ptr(), arith.data_ptr())
    return exact, arith


def test_same_bits_for_every_value_but_nan(lib):
    upper = torch.arange(1 << 16, dtype=torch.int64) << 16
    lows = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234], dtype=torch.int64)
    bits = (upper[:, None] | lows[None, :]).reshape(-1).to(torch.int64)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    exact, arith = rounded(lib, bits)
    values = bits.view(torch.float32)
    nan = values.isnan()
    assert int((~nan).sum()) > 400_000
    assert torch.equal(exact[~nan], arith[~nan])  # ties to even, overflow to inf, subnormals
    assert torch.equal(values[~nan].bfloat16().float().view(torch.int32), exact[~nan])
    clean = nan & (bits & 0xFFFF == 0)  # bfloat16 NaNs, the CPU's default NaN, bf16_round's
    assert arith[clean].view(torch.float32).isnan().all()
    assert torch.equal(arith[clean], bits[clean])  # kept as it is (to_bf16 makes it canonical)
    assert exact[nan].unique().tolist() == [0x7FC00000]
    low = torch.tensor([0x7F800001], dtype=torch.int32)  # a NaN with only low bits set
    assert rounded(lib, low)[1].view(torch.float32).isinf().all()  # why loads keep bf16_round
