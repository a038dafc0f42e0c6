"""End to end: `compress prune --method layers|channels` equals the original model with those
parts removed (a reference built here from the transformers model)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.compress.prune import PruneConfig, prune_checkpoint
from weightsmith.compress.prune.depth import layer_importance
from weightsmith.compress.prune.width import channel_importance, channels_to_keep
from weightsmith.core.calibration import load_calibration_text, load_tokenizer, tokenize_windows

CALIB = dict(calib_samples=4, seq_len=32)
IDS = torch.tensor([[1, 5, 9, 14, 2, 7, 30, 41, 3, 8, 11, 12]])


def _calib_ids(path) -> torch.Tensor:
    text = load_calibration_text(None).text
    return tokenize_windows(
        load_tokenizer(path), text, samples=CALIB["calib_samples"], seq_len=CALIB["seq_len"]
    )


def _layers(model):
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_drop_named_layer_equals_deleting_it(tiny_model, tmp_path, arch):
    src = tiny_model(arch)
    r = prune_checkpoint(
        src, tmp_path / "p", PruneConfig(method="layers", layers=(0,)), progress=False
    )
    assert r.extra["dropped_layers"] == [0] and r.extra["layers_after"] == 1
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    del _layers(ref)[0]
    for i, layer in enumerate(_layers(ref)):  # transformers indexes caches by layer_idx
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    key = "n_layer" if arch == "gpt2" else "num_hidden_layers"
    assert config[key] == 1
    if "layer_types" in config:
        assert len(config["layer_types"]) == 1 and "layer_types" in r.extra["config_keys_edited"]
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(IDS).logits, ref(IDS, use_cache=False).logits, atol=1e-6, rtol=0
        )
    assert r.extra["output_size"] < r.extra["input_size"]
    assert r.extra["params_after"] == sum(p.numel() for p in pruned.parameters())


def test_drop_scores_layers_like_transformers_hidden_states(tiny_model, tmp_path):
    src = tiny_model("llama")
    r = prune_checkpoint(
        src, tmp_path / "p", PruneConfig(method="layers", drop=1, **CALIB), progress=False
    )
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = _calib_ids(src)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[i] is layer i's input, except the last entry, which is after the final norm
    h_out0 = hs[1]
    score0 = layer_importance(hs[0], h_out0)
    assert r.extra["layer_scores"]["0"] == pytest.approx(score0, abs=1e-5)
    # layer 1's output (before the final norm) from a hook
    outs = []
    model.model.layers[1].register_forward_hook(
        lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(ids, use_cache=False)
    score1 = layer_importance(hs[1], outs[0])
    assert r.extra["layer_scores"]["1"] == pytest.approx(score1, abs=1e-5)
    assert r.extra["dropped_layers"] == [0 if score0 < score1 else 1]
    prov = json.loads((tmp_path / "p" / "weightsmith.json").read_text())
    assert prov["dropped_layers"] == r.extra["dropped_layers"]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_channels_equal_slicing_the_transformers_model(tiny_model, tmp_path, arch):
    src = tiny_model(arch)
    r = prune_checkpoint(
        src, tmp_path / "p", PruneConfig(method="channels", mlp_ratio=0.75, **CALIB), progress=False
    )
    assert r.extra["width_before"] == 128 and r.extra["width_after"] == 96
    kept = json.loads((tmp_path / "p" / "pruned_channels.json").read_text())["kept"]
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = _calib_ids(src)

    # layer 0's kept channels are the top 96 by ||x_j|| * ||W_down[:, j]|| of the dense model
    down_name = {"llama": "down_proj", "gpt_neox": "dense_4h_to_h", "gpt2": "c_proj"}[arch]
    mlp0 = _layers(ref)[0].mlp
    down0 = getattr(mlp0, down_name)
    acts = []
    h = down0.register_forward_pre_hook(lambda m, a: acts.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        ref(ids, use_cache=False)
    h.remove()
    norm = torch.cat(acts).double().pow(2).sum(0).sqrt().float()
    w_down = down0.weight.data.t() if arch == "gpt2" else down0.weight.data
    assert channels_to_keep(channel_importance(norm, w_down), 96).tolist() == kept["0"]

    # reference: slice the transformers model's weights by the recorded channels
    for i, layer in enumerate(_layers(ref)):
        idx = torch.tensor(kept[str(i)])
        for name, mod in layer.mlp.named_children():
            if not hasattr(mod, "weight"):
                continue
            gpt2 = arch == "gpt2"
            if name == down_name:
                mod.weight.data = mod.weight.data[idx] if gpt2 else mod.weight.data[:, idx]
            else:
                mod.weight.data = mod.weight.data[:, idx] if gpt2 else mod.weight.data[idx]
                if getattr(mod, "bias", None) is not None:
                    mod.bias.data = mod.bias.data[idx]
                if gpt2:
                    mod.nf = idx.numel()  # Conv1D keeps its output width in an attribute
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(IDS).logits, ref(IDS, use_cache=False).logits, atol=1e-6, rtol=0
        )
    assert r.extra["params_after"] == sum(p.numel() for p in pruned.parameters())
    assert r.extra["params_before"] - r.extra["params_after"] == 2 * 32 * (
        3 if arch == "llama" else 2
    ) * 64 + (
        0 if arch == "llama" else 2 * 32
    )  # 2 layers x 32 channels x (gate, up, down | in, out) x hidden, plus the input biases
    assert r.extra["output_size"] < r.extra["input_size"]
