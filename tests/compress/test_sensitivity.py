"""Per-unit quantization sensitivity (``eval sensitivity``): each unit's KL against a direct
computation (a fresh model copy with that Linear replaced by its RTN round trip, full forward,
KL in float64; equal within 1e-6 nats), the unit groupings, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from weightsmith.compress.rtn import RTNConfig, rtn_quantize
from weightsmith.compress.schemes import parse_scheme
from weightsmith.compress.sensitivity import (
    checkpoint_sensitivity,
    measure_sensitivity,
    parse_scheme_list,
    sensitivity_units,
)
from weightsmith.core.models import load_causal_lm
from weightsmith.errors import ConfigError


@pytest.fixture
def peaked_model(tiny_model, one_thread):
    """The tiny llama with weights x20 (std 0.4), so its next-token distributions are far from
    uniform and quantization moves them measurably."""
    model = load_causal_lm(tiny_model("llama"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)
    return model


def direct_kl(model, ids: torch.Tensor, module: str, scheme: str) -> float:
    """KL(original || copy with ``module`` RTN-quantized), computed the plain way."""
    s = parse_scheme(scheme)
    q = copy.deepcopy(model)
    lin = dict(q.named_modules())[module]
    cfg = RTNConfig(bits=s.bits, group_size=s.group_size, symmetric=s.symmetric)  # by hand
    with torch.no_grad():
        lin.weight.copy_(rtn_quantize(lin.weight.data, cfg).dequantize())
        p = F.log_softmax(model(input_ids=ids).logits.double(), -1)
        r = F.log_softmax(q(input_ids=ids).logits.double(), -1)
    return float((p.exp() * (p - r)).sum(-1).mean())


def test_kl_matches_direct_computation(peaked_model):
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in peaked_model.state_dict().items()}
    schemes = parse_scheme_list("w3g32,w4g64a,w8g64")
    r = measure_sensitivity(peaked_model, ids, schemes)
    assert len(r.units) == 14 and r.tokens == 48
    for unit, scheme in [
        ("model.layers.0.self_attn.q_proj", "w3g32"),  # from layer 0: the whole model runs
        ("model.layers.1.mlp.down_proj", "w4g64a"),  # layer 1: starts from cached inputs
        ("model.layers.1.self_attn.v_proj", "w3g32"),
    ]:
        want = direct_kl(peaked_model, ids, unit, scheme)
        assert want > 1e-3  # not a trivial zero
        assert r.kl[unit][scheme] == pytest.approx(want, abs=1e-6)
    assert all(v >= 0 for per in r.kl.values() for v in per.values())
    # more bits, less damage (summed over units)
    total = {str(s): sum(r.kl[u.name][str(s)] for u in r.units) for s in schemes}
    assert total["w8g64"] < total["w4g64a"] < total["w3g32"]
    after = peaked_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored


def test_units_by_layer_and_type(peaked_model):
    by_module = sensitivity_units(peaked_model, "module")
    by_layer = sensitivity_units(peaked_model, "layer")
    by_type = sensitivity_units(peaked_model, "type")
    assert [u.name for u in by_layer] == ["model.layers.0", "model.layers.1"]
    assert len(by_type) == 7 and by_type[-1].name == "mlp.down_proj"
    assert by_type[-1].modules == ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert by_type[-1].layer == 0 and by_layer[1].layer == 1
    total = sum(u.params for u in by_module)
    assert sum(u.params for u in by_layer) == sum(u.params for u in by_type) == total
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    r = measure_sensitivity(peaked_model, ids, parse_scheme_list("w4g64"), by="type")
    assert set(r.kl) == {u.name for u in by_type}


def test_group_that_does_not_fit(peaked_model):
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(3))
    # g128 divides down_proj's 128 input columns only (the others have 64): skipped elsewhere
    r = measure_sensitivity(peaked_model, ids, parse_scheme_list("w4g128,w4g32"))
    assert r.kl["model.layers.0.mlp.down_proj"]["w4g128"] is not None
    assert r.kl["model.layers.0.self_attn.q_proj"]["w4g128"] is None
    assert "w4g128" not in r.to_dict()["units"][0]["schemes"]
    with pytest.raises(ConfigError, match=r"model.layers.0.self_attn.q_proj: no scheme of w4g128"):
        measure_sensitivity(peaked_model, ids, parse_scheme_list("w4g128"))


def test_bad_input(tiny_model, tmp_path):
    for bad in ("w4x", "w9g64", "q4g64", "w4g0", "w4g64,w4g64", ""):
        with pytest.raises(ConfigError):
            parse_scheme_list(bad)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(
        ConfigError, match=r"short.txt: \d+ tokens, fewer than the 512 that --samples 4"
    ):
        checkpoint_sensitivity(tiny_model("llama"), parse_scheme_list("w4g32"), calib=str(short))
    with pytest.raises(ConfigError, match="--by"):
        sensitivity_units(load_causal_lm(tiny_model("llama")), "row")
