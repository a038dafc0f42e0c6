"""``compare`` dequantizes the quantized Linears weightsmith writes, so plots and tables show the
rounding error: every decoded weight matches the in-memory quantizer's own dequantization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weightsmith.compare import compare_checkpoints, format_comparison, tensor_diff
from weightsmith.compress.quantize import quantize_checkpoint
from weightsmith.compress.registry import QuantConfig
from weightsmith.compress.rtn import rtn_quantize
from weightsmith.io.reader import open_checkpoint


@pytest.mark.parametrize(
    "fmt,symmetric,bits",
    [("compressed-tensors", True, 4), ("compressed-tensors", False, 3), ("gptq", False, 4),
     ("bnb", True, 4)],
)  # fmt: skip
def test_quantized_outputs_are_dequantized(
    tmp_path: Path, tiny_model, fmt: str, symmetric: bool, bits: int
) -> None:
    src = tiny_model("llama", 0)
    grid = {} if fmt == "bnb" else dict(bits=bits, group_size=32, symmetric=symmetric)
    cfg = QuantConfig(method="nf4" if fmt == "bnb" else "rtn", format=fmt, **grid)
    out = tmp_path / "q"
    quantize_checkpoint(src, out, cfg, progress=False)
    result = compare_checkpoints(src, out)
    # every tensor is compared as a dense weight; no packed part is left over
    assert result["dequantized"] == 14 and result["compared"] == 21
    assert result["only_in_a"] == result["only_in_b"] == [] and not result["shape_mismatch"]
    assert "14 dequantized" in format_comparison(result)
    with open_checkpoint(src) as ckpt:
        for t in result["tensors"]:
            w = ckpt.get_tensor(t["name"]).float()
            if not t["dequantized"]:
                assert t["equal"], t["name"]  # embeddings, norms, lm_head copied unchanged
                continue
            if fmt == "bnb":
                from weightsmith.compress.nf4 import nf4_dequantize, nf4_quantize_tensor

                expected = nf4_dequantize(nf4_quantize_tensor(w))
            else:  # the quantizer's levels and scales, before any packing (gptq stores fp16)
                scale_dtype = torch.float16 if fmt == "gptq" else torch.float32
                expected = rtn_quantize(w, cfg, dtype=scale_dtype).dequantize()
            ref = tensor_diff(w, expected)
            assert t["rel_l2"] == pytest.approx(ref.rel_l2, rel=1e-9), t["name"]
            assert t["cosine"] == pytest.approx(ref.cosine, rel=1e-9)
            assert t["zeros_b"] == ref.zeros_b and t["layer"] is not None
            # min-max rounding error ~ step/sqrt(12): a few % at 4 bits, more at 3
            assert 0.01 < t["rel_l2"] < (0.25 if bits == 3 else 0.15)


def test_undecodable_quantization_is_said() -> None:
    from weightsmith.compress.registry import format_reading

    fake = {"compared": 0, "identical": 0, "only_in_a": ["w"], "only_in_b": ["w_packed"],
            "shape_mismatch": [], "tensors": [], "quantization": {"a": None, "b": "made-up"}}  # fmt: skip
    assert format_reading("made-up") is None
    assert "B is quantized with 'made-up', which compare cannot decode" in format_comparison(fake)
