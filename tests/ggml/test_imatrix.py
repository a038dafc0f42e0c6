"""The importance matrix: the calibration statistic (against a plain transformers forward with
hooks, the whole model in memory), llama.cpp's imatrix file formats (written, read back, legacy
.dat read), bad input."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch

from weightsmith.core.calibration_data import (
    load_calibration_text,
    load_tokenizer,
)
from weightsmith.core.statistics import STATISTICS
from weightsmith.errors import CheckpointError, ConfigError, OutputError
from weightsmith.ggml.imatrix import (
    Imatrix,
    collect_imatrix,
    imatrix_chunks,
    load_imatrix,
    save_imatrix,
)


def test_imatrix_statistic_hand_computed():
    stat = STATISTICS["imatrix"](2)
    stat.add(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    stat.add(torch.tensor([[0.0, -2.0]]))
    assert stat.n == 3
    assert stat.sum.tolist() == [10.0, 24.0]
    assert stat.result().tolist() == [np.float32(10.0 / 3), 8.0]  # float32


def _reference_imatrix(model_dir, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean x^2 per input column of every decoder-layer Linear, whole model in memory."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    for name, mod in model.named_modules():
        parts = name.split(".")
        if isinstance(mod, torch.nn.Linear) and "layers" in parts:
            key = f"blk.{parts[parts.index('layers') + 1]}.{short[parts[-1]]}.weight"

            def hook(m, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
                counts[key] = counts.get(key, 0) + x.shape[0]

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {k: (sums[k] / counts[k]).float().numpy() for k in sums}


def test_collect_imatrix_matches_full_model_forward(tiny_model, tmp_path):
    model = tiny_model("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(load_calibration_text(None).text)
    im = collect_imatrix(model, calib, samples=4, seq_len=32)
    ids = imatrix_chunks(
        load_tokenizer(model), load_calibration_text(calib).text, samples=4, seq_len=32
    )
    ref = _reference_imatrix(model, ids)
    assert set(im.sums) == set(ref) and len(ref) >= 7
    assert set(im.counts.values()) == {ids.numel()}
    assert im.chunk_count == 4 and im.chunk_size == 32 and im.datasets == [str(calib)]
    got = im.importance()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, err_msg=name)
    # q/k/v read the same normed input
    np.testing.assert_array_equal(im.sums["blk.0.attn_q.weight"], im.sums["blk.0.attn_v.weight"])


def test_chunks_like_llama_imatrix(stories260k):
    """BOS + the text's tokens, cut in chunks whose first token is set to BOS (stories260K's
    tokenizer adds BOS = 1); whole chunks only."""
    tok = load_tokenizer(stories260k)
    text = "Once upon a time, there was a little girl named Lily. " * 20
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunks = imatrix_chunks(tok, text, samples=3, seq_len=16)
    assert chunks.shape == (3, 16) and (chunks[:, 0] == 1).all()
    assert chunks[0, 1:].tolist() == ids[:15]
    assert chunks[1, 1:].tolist() == ids[16:31]  # token 15 of the text is overwritten by BOS
    with pytest.raises(
        ConfigError, match=r"calibration text \(given\): \d+ tokens, fewer than the 48"
    ):
        imatrix_chunks(tok, "Once", samples=3, seq_len=16)


def _example() -> Imatrix:
    rng = np.random.default_rng(0)
    return Imatrix(
        sums={"blk.0.attn_q.weight": rng.random(64, dtype=np.float32) * 100,
              "blk.0.ffn_down.weight": rng.random(172, dtype=np.float32)},
        counts={"blk.0.attn_q.weight": 300, "blk.0.ffn_down.weight": 0},
        datasets=["calib.txt"], chunk_count=3, chunk_size=100,
    )  # fmt: skip


def test_save_load_gguf_format(tmp_path):
    im = _example()
    path = save_imatrix(tmp_path / "m.imatrix.gguf", im)
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    assert r.fields["imatrix.chunk_size"].contents() == 100
    names = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    assert names["blk.0.attn_q.weight.in_sum2"] == (64, 1)  # ne0 = columns, ne1 = matrices
    assert names["blk.0.attn_q.weight.counts"] == (1, 1)
    back = load_imatrix(path)
    assert back.datasets == ["calib.txt"] and back.chunk_count == 3
    for name in im.sums:
        np.testing.assert_array_equal(back.sums[name], im.sums[name])
    imp = back.importance()
    np.testing.assert_array_equal(
        imp["blk.0.attn_q.weight"], im.sums["blk.0.attn_q.weight"] / np.float32(300)
    )
    assert (imp["blk.0.ffn_down.weight"] == 1).all()  # no token seen: llama-quantize uses 1


def test_legacy_dat_read(tmp_path):
    vals = np.array([2.0, 4.0, 6.0], np.float32)
    name = b"blk.1.ffn_up.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 2, 3)
    (tmp_path / "old.dat").write_bytes(data + vals.tobytes() + struct.pack("<i", 2))
    im = load_imatrix(tmp_path / "old.dat")
    np.testing.assert_array_equal(im.importance()["blk.1.ffn_up.weight"], vals / 2)


def test_bad_input(tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists"):
        save_imatrix(out, _example())
    save_imatrix(out, _example(), force=True)
    assert load_imatrix(out).counts["blk.0.attn_q.weight"] == 300
    with pytest.raises(ConfigError, match="empty"):
        save_imatrix(tmp_path / "e.gguf", Imatrix())
    bad = _example()
    bad.sums["blk.0.attn_q.weight"][3] = np.nan
    with pytest.raises(ConfigError, match="non-finite"):
        save_imatrix(tmp_path / "n.gguf", bad)
    assert not (tmp_path / "n.gguf").exists() and not list(tmp_path.glob(".n.gguf*"))
    (tmp_path / "junk").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError):
        load_imatrix(tmp_path / "junk")
