"""The calibration engine's shortcuts: Linears fed the same input share one statistic, and
unchanged submodule outputs are reused across a layer's passes. Both must give what the full
transformers model gives (float32 round-off: atol 1e-6 on hidden states, rtol 1e-5 on
Hessians, which are sums of 5·24 token outer products)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.core import calibration_memo
from weightsmith.core.calibration import (
    CalibrationLayer,
    LayerStreamer,
    load_calibration_text,
    load_tokenizer,
    tokenize_windows,
)
from weightsmith.io import open_checkpoint

GROUPS = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]  # fmt: skip


def _ids(path: Path, samples: int = 5, seq_len: int = 24) -> torch.Tensor:
    text = load_calibration_text(None).text
    return tokenize_windows(load_tokenizer(path), text, samples=samples, seq_len=seq_len)


def _reference(path: Path, ids: torch.Tensor, halved: list[str]):
    """Layer 0 of the full model with the Linears ``halved`` scaled by 0.5: the Hessian
    ``2/n·XᵀX`` of every Linear's input, and the layer's outputs."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    layer = model.model.layers[0]
    xs: dict[str, list[torch.Tensor]] = {}
    outs: list[torch.Tensor] = []
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if name in halved:
                mod.weight.data.mul_(0.5)
            mod.register_forward_pre_hook(
                lambda m, a, n=name: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))
            )
    layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for s in range(0, ids.shape[0], 2):
            model(ids[s : s + 2])
    hess = {n: 2 * torch.cat(x).t() @ torch.cat(x) / torch.cat(x).shape[0] for n, x in xs.items()}
    return hess, torch.cat(outs)


@pytest.mark.parametrize("linear_memo", [True, False])
def test_true_sequential_passes_match_the_full_model(tiny_model, monkeypatch, linear_memo):
    # GPTQ's schedule: collect a group's Hessians, change its weights, next group. Each group's
    # Hessians must be those of the full model with the earlier groups changed (the later
    # passes reuse self_attn's output), and the final outputs those with every group changed.
    if not linear_memo:  # no room for Linear outputs: only the children are reused
        monkeypatch.setattr(calibration_memo, "LINEAR_MEMO_BYTES", 0)
    path = tiny_model("llama")
    ids = _ids(path)
    got: dict[str, torch.Tensor] = {}
    memos = []

    def cb(cl: CalibrationLayer):
        memos.append(cl._streamer._memo)
        for group in GROUPS:
            stats = cl.collect(list(group), "hessian")
            for n in group:
                got[n] = stats[n].result()
            for n in group:
                cl.set_weight(n, cl.weight(n) * 0.5)

    with open_checkpoint(path) as ckpt:
        streamer = LayerStreamer(ckpt, ids, batch_size=2)
        streamer.run_layer(0, cb)
        hidden = streamer.hidden_states()
    done: list[str] = []
    for group in GROUPS:
        ref, _ = _reference(path, ids, done)
        for n in group:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)
        done += group
    _, out = _reference(path, ids, done)
    torch.testing.assert_close(hidden, out, atol=1e-6, rtol=0)
    # 3 batches; self_attn reused in the down_proj pass and the final one; with the Linears'
    # memo also q/k/v in the gate/up pass (o_proj changed: self_attn runs, q/k/v do not) and
    # gate/up in the final pass (their outputs from the down_proj pass)
    assert memos[0].hits == 3 * (2 + (3 + 2 if linear_memo else 0))
    # shared statistics are copies: handing one over (GPTQ overwrites it) leaves the others
    assert got["self_attn.q_proj"].data_ptr() != got["self_attn.k_proj"].data_ptr()
    torch.testing.assert_close(got["self_attn.k_proj"], got["self_attn.v_proj"], rtol=0, atol=0)


def test_a_hooked_linear_is_never_skipped(tiny_model):
    # A forward hook inside self_attn (another tool's) must see every pass: no reuse there.
    path = tiny_model("llama")
    ids = _ids(path, samples=4)
    calls, hits = [], []

    def cb(cl: CalibrationLayer):
        cl.linears["self_attn.q_proj"].register_forward_hook(lambda *a: calls.append(1))
        cl.collect(["mlp.down_proj"], "hessian")
        cl.collect(["mlp.down_proj"], "hessian")
        # self_attn never (q_proj inside it is hooked); k/v/o and gate/up on their own:
        # reused in the second pass (2 batches x 5)
        assert cl._streamer._memo.hits == 2 * 5
        hits.append(cl._streamer._memo)

    with open_checkpoint(path) as ckpt:
        LayerStreamer(ckpt, ids, batch_size=2).run_layer(0, cb)
    assert len(calls) == 2 * 3  # 2 batches x (2 collect passes + the final pass)
    assert hits[0].hits == 2 * 5 * 2  # and again in the final pass


def test_a_calibrated_quantize_builds_the_skeleton_once(tiny_model, tmp_path, monkeypatch):
    """The quantize job's skeleton (used to find the Linears) is the one the calibration
    streams layers through: transformers builds the model once per run."""
    from weightsmith.compress import QuantConfig, quantize_checkpoint
    from weightsmith.compress import quantize as quantize_mod
    from weightsmith.core import calibration as calibration_mod

    built = []
    real = calibration_mod.build_skeleton

    def counting(ckpt):
        built.append(ckpt.root)
        return real(ckpt)

    monkeypatch.setattr(calibration_mod, "build_skeleton", counting)
    monkeypatch.setattr(quantize_mod, "build_skeleton", counting)
    cfg = QuantConfig("gptq", bits=4, group_size=32, calib_samples=4, seq_len=16)
    quantize_checkpoint(tiny_model("llama"), tmp_path / "q", cfg, progress=False)
    assert len(built) == 1
