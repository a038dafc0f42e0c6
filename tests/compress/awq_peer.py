"""Run llm-compressor's ``AWQModifier`` + ``QuantizationModifier`` (its own venv,
$LLMCOMPRESSOR_VENV) on a checkpoint and token windows: the smoothed state dict (with
llm-compressor's weight_scale/zero_point) and the scales each mapping's search chose."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from weightsmith.testing.peers import require_peer

AWQ_DRIVER = """
import sys, json, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
src, out, ids_file, spec = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ids = json.load(open(ids_file))
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
from llmcompressor.pipelines.cache import IntermediatesCache
IntermediatesCache.pin_memory = lambda self, i: None  # CPU only: no pinned memory
chosen = {}
search = AWQModifier._compute_best_scale
def record(self, mapping, *args, **kwargs):
    start = len(losses)
    s = search(self, mapping, *args, **kwargs)
    chosen[mapping.smooth_name] = s.clone()
    mine = losses[start:]
    picked[mapping.smooth_name] = min(range(len(mine)), key=mine.__getitem__)
    return s
AWQModifier._compute_best_scale = record
weights = {"num_bits": spec["bits"], "type": "int", "symmetric": spec["symmetric"],
           "strategy": "group", "group_size": spec["group_size"]}
losses, picked = [], {}
compute_loss = AWQModifier._compute_loss
def record_loss(self, *args):
    loss = compute_loss(self, *args)
    losses.append(loss)
    return loss
AWQModifier._compute_loss = record_loss
recipe = [AWQModifier(duo_scaling=spec["duo_scaling"], n_grid=spec["n_grid"]),
          QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}},
                               ignore=["lm_head"])]
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ids),
        max_seq_length=len(ids[0]))
torch.save({"state": model.state_dict(), "scales": chosen, "picked": picked}, out)
"""


def run_awq_modifier(src: Path, ids: torch.Tensor, spec: dict, work: Path) -> dict:
    """``{"state": state dict, "scales": smooth module name -> chosen scales, "picked": ->
    the index of the chosen grid point}`` after
    llm-compressor's AWQ (``spec``: bits, group_size, symmetric, duo_scaling, n_grid) on
    exactly the token windows ``ids``."""
    python = require_peer("llmcompressor")
    (work / "ids.json").write_text(json.dumps(ids.tolist()))
    argv = [str(src), str(work / "awq.pt"), str(work / "ids.json"), json.dumps(spec)]
    r = subprocess.run([str(python), "-c", AWQ_DRIVER, *argv], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(work / "awq.pt")


def build_awq_model(out: Path, seed: int = 0, arch: str = "llama", **overrides) -> Path:
    """A tiny seeded model whose norms are ``1 + 0.2·N(0, 1)`` (not N(0, 0.02), which makes
    every activation ~0) and whose embeddings carry 10% of channels ×6 (activation outliers,
    what AWQ scales for)."""
    from safetensors.torch import load_file, save_file

    from weightsmith.testing import build_tiny_model

    src = build_tiny_model(out, arch, seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    for f in sorted(src.glob("*.safetensors")):
        d = load_file(f)
        for k in d:
            if k.endswith("norm.weight"):
                d[k] = 1 + 0.2 * torch.randn(d[k].shape, generator=g)
            if k.endswith("embed_tokens.weight"):
                d[k] = d[k] * (1 + 5 * (torch.rand(d[k].shape[1], generator=g) > 0.9))
        save_file(d, f, metadata={"format": "pt"})
    return src
