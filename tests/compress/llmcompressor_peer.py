"""Run llm-compressor's ``model_free_ptq`` (its own venv, $LLMCOMPRESSOR_VENV) and compare its
output with weightsmith's, tensor by tensor and bit by bit (helper of the parity tests)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from weightsmith.testing.peers import require_peer

DRIVER = """
import sys
from llmcompressor import model_free_ptq
args = sys.argv[1:]
for src, out, scheme in zip(args[0::3], args[1::3], args[2::3]):
    model_free_ptq(model_stub=src, save_directory=out, scheme=scheme,
                   ignore=["lm_head", "model.embed_tokens"], device="cpu")
"""


def run_model_free_ptq(jobs: list[tuple[Path, Path, str]]) -> None:
    """``model_free_ptq(src, out, scheme)`` for each job, in one peer process; ignores
    ``lm_head`` and ``model.embed_tokens`` as llm-compressor's examples do."""
    python = require_peer("llmcompressor")
    argv = [str(x) for job in jobs for x in job]
    r = subprocess.run([str(python), "-c", DRIVER, *argv], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


SMOOTHQUANT_DRIVER = """
import sys, json, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
src, out, ids_file, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ids = json.load(open(ids_file))
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
oneshot(model=model, dataset=ds, recipe=[SmoothQuantModifier(smoothing_strength=alpha)],
        num_calibration_samples=len(ids), max_seq_length=len(ids[0]))
torch.save(model.state_dict(), out)
"""


def run_smoothquant_modifier(src: Path, ids: torch.Tensor, alpha: float, work: Path) -> dict:
    """The state dict of ``src`` after llm-compressor's ``SmoothQuantModifier`` alone (oneshot,
    calibrated on exactly the token windows ``ids``)."""
    python = require_peer("llmcompressor")
    (work / "ids.json").write_text(json.dumps(ids.tolist()))
    argv = [str(src), str(work / "smoothed.pt"), str(work / "ids.json"), str(alpha)]
    r = subprocess.run(
        [str(python), "-c", SMOOTHQUANT_DRIVER, *argv], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(work / "smoothed.pt")


def load_dir(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors, json.loads((folder / "config.json").read_text())["quantization_config"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def assert_same_output(ours: Path, theirs: Path) -> None:
    """Same tensor names, dtypes, shapes and bits; same quantization_config except ``ignore``
    (theirs also lists model.embed_tokens, which is no Linear)."""
    a, qa = load_dir(ours)
    b, qb = load_dir(theirs)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for name in sorted(a):
        x, y = a[name], b[name]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), (name, x.dtype, y.dtype, x.shape, y.shape)
        assert torch.equal(_bits(x), _bits(y)), f"{name} differs from llm-compressor's"
    assert qa.pop("ignore") == ["lm_head"]
    assert qb.pop("ignore") == ["lm_head", "model.embed_tokens"]
    assert qa == qb
