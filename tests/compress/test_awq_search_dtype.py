"""AWQ's search dtype (``--awq-search-dtype``): "auto" resolves by the hardware, a bfloat16
search runs on a bfloat16 copy of the parent and measures nearly the float32 losses (bfloat16
rounding: within 3 % per grid point here) against the float32 reference, and leaves the layer
as it was."""

from __future__ import annotations

import pytest
import torch

from tests.compress.awq_peer import build_awq_model
from weightsmith.compress import awq_search as S
from weightsmith.compress.awq import AWQConfig
from weightsmith.compress.rtn import rtn_quantize
from weightsmith.core.calibration import LayerStreamer
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint


@pytest.mark.parametrize(("avx512_bf16", "amx", "want"), [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32),
])  # fmt: skip
def test_auto_takes_bfloat16_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, want):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert S.search_dtype("auto", torch.device("cpu")) == want
    assert S.search_dtype("float32", torch.device("cpu")) == torch.float32
    assert S.search_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_an_unknown_search_dtype_is_refused():
    with pytest.raises(ConfigError, match="--awq-search-dtype"):
        AWQConfig(bits=4, group_size=32, awq_search_dtype="float16").validate()


def test_bfloat16_losses_follow_the_float32_ones(tmp_path):
    src = build_awq_model(tmp_path / "m", arch="llama", num_key_value_heads=4)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    o = AWQConfig(bits=4, group_size=32)

    def quant(w):
        return rtn_quantize(w, o, dtype=torch.float32).dequantize()

    seen = []

    def step(cl):
        mappings = S.resolve_mappings(cl, set(cl.linear_names))
        inputs, x_means = S.capture(cl, mappings)
        before = {n: cl.weight(n) for n in cl.linear_names}
        for m in mappings:
            if m.balance == (m.parent,):
                continue  # the XᵀX loss: float32 whatever the dtype
            args = (cl, m, inputs[m.parent], x_means[m.balance[0]], quant)
            kw = dict(group_size=32, n_grid=o.n_grid, duo_scaling="true")
            _, f32 = S.search_scales(*args, **kw, dtype=torch.float32)
            _, bf16 = S.search_scales(*args, **kw, dtype=torch.bfloat16)
            a, b = torch.tensor(f32["losses"]), torch.tensor(bf16["losses"])
            assert not torch.equal(a, b)  # the bfloat16 forwards did run
            assert torch.allclose(b, a, rtol=0.03), (m.parent, (b / a - 1).abs().max())
            seen.append(m.parent)
        for n, w in before.items():
            assert torch.equal(cl.weight(n), w), n

    with open_checkpoint(src) as ckpt:
        LayerStreamer(ckpt, ids).run_layer(0, step)
    assert seen == ["self_attn", "mlp"]
