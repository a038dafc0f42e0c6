"""The layer-streamed calibration engine against the full transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.core.calibration import (
    CalibrationLayer,
    LayerStreamer,
    load_calibration_text,
    load_tokenizer,
    tokenize_windows,
)
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint


def _ids(path: Path, samples: int = 5, seq_len: int = 24) -> torch.Tensor:
    text = load_calibration_text(None).text
    return tokenize_windows(load_tokenizer(path), text, samples=samples, seq_len=seq_len)


def _reference_layer_outputs(path: Path, ids: torch.Tensor, batch: int, edit=None) -> list:
    """Outputs of each decoder layer of the full transformers model (forward hooks)."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if edit is not None:
        edit(model)
    base = model.base_model
    layers = base.layers if hasattr(base, "layers") else base.h
    outs: list[list[torch.Tensor]] = [[] for _ in layers]
    for i, layer in enumerate(layers):
        layer.register_forward_hook(
            lambda m, a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o)
        )
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch):
            model(ids[s : s + batch])
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "gpt2"])
def test_identity_callback_matches_transformers_hidden_states(tiny_model, arch):
    # Same kernels, same inputs: the per-layer outputs agree to float32 round-off (atol 1e-6).
    path = tiny_model(arch)
    ids = _ids(path)
    ref = _reference_layer_outputs(path, ids, batch=2)
    with open_checkpoint(path) as ckpt:
        streamer = LayerStreamer(ckpt, ids, batch_size=2)
        assert streamer.layers() == [0, 1]
        for i in streamer.layers():
            tensors = streamer.run_layer(i, lambda cl: cl.state_dict())
            assert set(tensors) == set(ckpt.layers()[i])
            torch.testing.assert_close(streamer.hidden_states(), ref[i], atol=1e-6, rtol=0)


def test_modified_weights_feed_the_next_layer(tiny_model):
    # Zeroing layer 0's o_proj in the callback must change layer 1's inputs exactly as in the
    # full model with that weight zeroed.
    path = tiny_model("llama")
    ids = _ids(path, samples=3)

    def zero(model):
        model.model.layers[0].self_attn.o_proj.weight.data.zero_()

    ref = _reference_layer_outputs(path, ids, batch=3, edit=zero)

    def cb(cl: CalibrationLayer):
        if cl.index == 0:
            w = cl.weight("self_attn.o_proj")
            cl.set_weight("self_attn.o_proj", torch.zeros_like(w))
        return None

    with open_checkpoint(path) as ckpt:
        streamer = LayerStreamer(ckpt, ids, batch_size=3)
        for i in streamer.layers():
            streamer.run_layer(i, cb)
            torch.testing.assert_close(streamer.hidden_states(), ref[i], atol=1e-6, rtol=0)


def test_collect_sees_linear_inputs_and_gpt2_weights_are_out_in(tiny_model):
    path = tiny_model("gpt2")
    ids = _ids(path, samples=2, seq_len=16)

    class Count:
        def __init__(self) -> None:
            self.rows, self.cols = 0, None

        def add(self, x: torch.Tensor) -> None:
            self.rows += x.shape[0]
            self.cols = x.shape[1]

    with open_checkpoint(path) as ckpt:
        streamer = LayerStreamer(ckpt, ids)

        def cb(cl: CalibrationLayer):
            assert cl.sequential_groups[0] == ("attn.c_attn",)
            w = cl.weight("attn.c_attn")
            assert w.shape == (192, 64)  # (out, in) although GPT-2 stores (in, out)
            stats = cl.collect(["attn.c_attn", "mlp.c_proj"], lambda n, m: Count())
            assert (stats["attn.c_attn"].rows, stats["attn.c_attn"].cols) == (32, 64)
            assert stats["mlp.c_proj"].cols == 128
            return None

        streamer.run_layer(0, cb)
        with pytest.raises(RuntimeError, match="in order"):
            streamer.run_layer(0, cb)


def test_calibration_text_sources(tmp_path):
    builtin = load_calibration_text(None)
    assert builtin.builtin and len(builtin.text) > 3000
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"body": "beta"}) + "\n")
    assert load_calibration_text(jl).text == "alpha\n\nbeta"
    with pytest.raises(ConfigError, match="no such file"):
        load_calibration_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        load_calibration_text(bad)
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_calibration_text(tmp_path / "e.txt")


def test_tokenize_windows_shapes(tiny_model):
    tok = load_tokenizer(tiny_model("llama"))
    text = load_calibration_text(None).text
    assert tokenize_windows(tok, text, samples=4, seq_len=16).shape == (4, 16)
    ids = tok(text[:2000], add_special_tokens=False)["input_ids"]
    assert tokenize_windows(tok, text, samples=4, seq_len=16).flatten().tolist() == ids[:64]
    # Too little text for samples x seq_len is an error naming the text and the numbers, not
    # fewer (or shorter) windows.
    n = len(tok("Once upon a time", add_special_tokens=False)["input_ids"])
    msg = rf"calibration text s.txt: {n} tokens, fewer than the 2048 that --calib-samples 4"
    with pytest.raises(ConfigError, match=msg):
        tokenize_windows(tok, "Once upon a time", samples=4, seq_len=512, source="s.txt")
    a64 = " ".join(["a"] * 64)  # 64 tokens
    assert tokenize_windows(tok, a64, samples=8, seq_len=8).shape == (8, 8)  # exactly enough
    with pytest.raises(ConfigError, match="64 tokens, fewer than the 65"):  # one token short
        tokenize_windows(tok, a64, samples=5, seq_len=13)


@pytest.mark.slow
def test_real_model_stories260k(stories260k):
    # A real checkpoint (tied embeddings, GQA): identity callback reproduces transformers.
    ids = _ids(stories260k, samples=3, seq_len=64)
    ref = _reference_layer_outputs(stories260k, ids, batch=3)
    with open_checkpoint(stories260k) as ckpt:
        streamer = LayerStreamer(ckpt, ids, batch_size=3)
        for i in streamer.layers():
            streamer.run_layer(i, lambda cl: None)
            torch.testing.assert_close(streamer.hidden_states(), ref[i], atol=1e-5, rtol=0)
