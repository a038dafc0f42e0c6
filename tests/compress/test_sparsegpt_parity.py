"""Same masks and weights as llm-compressor's SparseGPTModifier (run from its own venv,
``$LLMCOMPRESSOR_VENV``) on a tiny seeded Llama, with the same calibration tokens and settings
(block 128, dampening 0.01, sequential pipeline: each layer calibrated on the pruned layers
before it). Masks must be identical; weights agree within 1e-5 absolute (weights ~N(0, 0.02);
the two accumulate the Hessian in different orders, in float32)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from weightsmith.compress.prune import PruneConfig, prune_checkpoint
from weightsmith.core.calibration import load_calibration_text, load_tokenizer, tokenize_windows
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import require_peer

SAMPLES, SEQ = 8, 64

DRIVER = """
import sys, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

model_dir, ids_file, out, structure = sys.argv[1:5]
ids = torch.load(ids_file)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
recipe = SparseGPTModifier(sparsity=0.5, mask_structure=structure, block_size=128,
                           dampening_frac=0.01, targets=["Linear"], ignore=["re:.*lm_head"])
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
        batch_size=1)
model.save_pretrained(out, save_compressed=False)
"""

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("structure", ["0:0", "2:4"])
def test_matches_llmcompressor(tmp_path: Path, structure: str) -> None:
    python = require_peer("llmcompressor")
    model = build_tiny_model(tmp_path / "m", "llama", seed=0)
    calib = tmp_path / "calib.txt"
    calib.write_text(load_calibration_text(None).text)
    ids = tokenize_windows(load_tokenizer(model), calib.read_text(), samples=SAMPLES, seq_len=SEQ)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "driver.py").write_text(DRIVER)
    theirs = tmp_path / "theirs"
    subprocess.run(
        [str(python), str(tmp_path / "driver.py"), str(model), str(tmp_path / "ids.pt"),
         str(theirs), structure],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    ours = tmp_path / "ours"
    pattern = (2, 4) if structure == "2:4" else None
    cfg = PruneConfig(method="sparsegpt", sparsity=None if pattern else 0.5, pattern=pattern,
                      calib=str(calib), calib_samples=SAMPLES, seq_len=SEQ,
                      damp=0.01,  # llm-compressor's dampening_frac and N:M rule
                      nm_select="score" if pattern else "obs")  # fmt: skip
    prune_checkpoint(model, ours, cfg, progress=False)
    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    compared = 0
    for n in a.tensors:
        wa, wb = a.get_tensor(n), b.get_tensor(n)
        if ".layers." in n and n.endswith("_proj.weight"):
            assert_near_tie_parity(n, wa, wb)
            compared += 1
        else:
            assert torch.equal(wa, wb), n
    assert compared == 14


def assert_near_tie_parity(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """The same masks and weights (atol 1e-5), except for near-ties: the two tools' Hessians
    differ in the last float32 bits (up to ~2e-6 in the weights), which can swap which of two
    almost equally scored entries is pruned (seen: 2 of 4,096 entries of one layer-1 o_proj).
    Unstructured masks rank a whole block of columns across rows, so the swapped pair may sit
    in two rows. A swap changes the OBS update of the rest of those rows, so they are exempt
    from the weight comparison; at most one swapped pair (2 entries, 2 rows) per tensor."""
    flipped = (ours == 0) != (theirs == 0)
    rows = flipped.any(dim=1)
    assert int(flipped.sum()) <= 2 and int(rows.sum()) <= 2, (name, int(flipped.sum()))
    assert int((ours == 0).sum()) == int((theirs == 0).sum()), name  # same sparsity
    torch.testing.assert_close(ours[~rows], theirs[~rows], rtol=0, atol=1e-5, msg=name)
