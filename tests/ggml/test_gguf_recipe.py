"""A recipe step writes a GGUF (`convert: {format: gguf, type: ...}`) and the next step
evaluates it: prune -> GGUF -> eval gate in one file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.evaluate import perplexity
from weightsmith.ggml.reader import is_gguf, materialize_hf
from weightsmith.ggml.writer import write_gguf


def test_prune_then_gguf_then_eval_gate(
    stories260k: Path, tinystories_valid: Path, tmp_path: Path
) -> None:
    text = tmp_path / "text.txt"
    text.write_text(tinystories_valid.read_text(encoding="utf-8")[:12000], encoding="utf-8")
    steps = [
        {"id": "pruned", "prune": {"args": [str(stories260k)], "method": "magnitude", "sparsity": 0.2}},
        {"id": "gguf", "convert": {"format": "gguf", "type": "Q8_0"}},
        {"id": "quality", "eval": {"data": "text.txt", "seq_len": 128, "max_tokens": 1500,
                                   "reference": "pruned", "gate": {"max_ppl_increase": "2%"}}},
    ]  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"steps": steps}))
    work, report = tmp_path / "work", tmp_path / "report.json"
    res = CliRunner().invoke(
        cli, ["run", str(recipe), "-o", str(work), "--no-progress", "--report", str(report)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    assert data["ok"] and data["steps"][2]["gates"][0]["passed"]
    out = work / "gguf"
    assert out.is_file() and is_gguf(out)  # no extension: found by its magic
    # the step wrote exactly what the Python API writes from the pruned checkpoint
    write_gguf(work / "pruned", tmp_path / "direct.gguf", type_name="Q8_0", progress=False)
    assert out.read_bytes() == (tmp_path / "direct.gguf").read_bytes()
    # and the eval step measured that file: same ppl as evaluating its dequantized copy
    ppl = perplexity(materialize_hf(out, tmp_path / "hf"), text, seq_len=128, max_tokens=1500).ppl
    assert math.isclose(data["steps"][2]["result"]["ppl"], ppl, rel_tol=1e-6)
