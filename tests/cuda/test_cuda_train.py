"""Training on CUDA (QAT, BitNet, KD distillation) against the same run on the CPU.

Same seed, same batches; the devices differ in float32 rounding only. Over 3 steps the losses
agree to 1e-3 relative (the first forward pass to ~1e-6; AdamW's normalised steps can amplify
a rounding difference in a near-zero gradient into at most one lr-sized move per step, which
changes the loss far less). Trained weights: within 3·lr of each other everywhere (the most
three AdamW steps can separate them), and 99.9 % of them within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from tests.cuda.cuda_testlib import OTHER, on_both
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model

LR = 1e-3
TRAIN = ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--lr", str(LR)]


def _losses(tmp_path, *args) -> dict[str, list[float]]:
    from tests.cuda.cuda_testlib import run

    out = {}
    for label, dev in (("cpu", "cpu"), ("other", OTHER)):
        r = run(*args, "-o", tmp_path / label, "--device", dev)
        out[label] = r.get("losses") or [r["final_loss"]]
    return out


def _close_weights(a, b) -> None:
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        for n in ca.tensors:
            x, y = ca.get_tensor(n).float(), cb.get_tensor(n).float()
            d = (x - y).abs()
            assert float(d.max()) <= 3 * LR + 1e-6, n
            assert float((d > 1e-4).float().mean()) <= 1e-3, n


@pytest.mark.parametrize("command", ["qat", "bitnet"])
def test_qat_and_bitnet_train_alike_on_cuda(command, llama, calib, tmp_path):
    extra = ["--group-size", "32"] if command == "qat" else []
    losses = _losses(tmp_path, "compress", command, llama, "--data", calib, *TRAIN, *extra)
    print(f"TRAIN {command}: loss cpu {losses['cpu']} other {losses['other']}")
    assert losses["other"] == pytest.approx(losses["cpu"], rel=1e-3)


def test_kd_distillation_trains_alike_on_cuda(llama, calib, tmp_path):
    student = build_tiny_model(tmp_path / "student", "llama", seed=1, num_hidden_layers=1)
    args = ["distill", "kd", "--teacher", llama, "--student", student, "--data", calib, *TRAIN]
    outs = on_both(tmp_path, *args)
    for side in outs.values():
        assert (side / "config.json").is_file()
    _close_weights(outs["cpu"], outs["other"])
    losses = _losses(tmp_path / "again", *args)
    print(f"TRAIN kd: losses cpu {losses['cpu']} other {losses['other']}")
    assert losses["other"] == pytest.approx(losses["cpu"], rel=1e-3)
    assert torch.cuda.is_available() or OTHER == "cpu"
