"""``merge extract-lora`` against mergekit-extract-lora 0.1.5 (its own venv) on tiny models.

Same inputs, same options: the same adapter tensor names, the same adapter_config (ranks,
rank_pattern, target modules, modules_to_save as sets), the same singular values (each
module's ‖A‖·‖B‖ structure) and the same merged deltas B @ A within 1e-6 (float32). Skips
without the mergekit venv, fails under WEIGHTSMITH_REQUIRE_PEERS=1.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from merge_testlib import run_cli
from safetensors.torch import load_file

from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import require_peer

pytestmark = pytest.mark.slow

CASES = {
    "default": ["--max-rank", "4"],
    "epsilon": ["--max-rank", "32", "--sv-epsilon", "0.3"],
    "embed": ["--max-rank", "6", "--embed-lora", "--no-distribute-scale"],
    # mergekit 0.1.5 crashes appending to a given --save-module tuple: name all it would add
    "regex": ["--max-rank", "3", "-e", r"layers\.0\."]
    + [f"--save-module={m}" for m in ("o_proj", "embed_tokens", "lm_head", "norm")]
    + ["--save-module=input_layernorm", "--save-module=post_attention_layernorm"],
    "include": ["--max-rank", "5", "-i", "mlp", "--skip-undecomposable"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple]:
    python = require_peer("mergekit")
    root = tmp_path_factory.mktemp("xlora")
    base = build_tiny_model(root / "base", "llama", seed=0)
    ft = build_tiny_model(root / "ft", "llama", seed=1)
    out = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = python.parent / "mergekit-extract-lora"
    for name, args in CASES.items():
        mk, ws = root / f"mk-{name}", root / f"ws-{name}"
        cmd = [str(script), "--model", str(ft), "--base-model", str(base), "--out-path", str(mk)]
        p = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        ws_args = [a.replace("--max-rank", "--rank") for a in args]
        r = run_cli("extract-lora", base, ft, "-o", ws, *ws_args)
        assert r.exit_code == 0, r.output
        out[name] = (mk, ws)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_adapter_as_mergekit(runs, case):
    mk, ws = runs[case]
    _assert_same_adapter(mk, ws)
    if case == "epsilon":
        ca = json.loads((mk / "adapter_config.json").read_text())
        assert ca["rank_pattern"], "ε should give modules of different ranks"


def test_model_plus_adapter_reextracted_as_mergekit(tmp_path):
    """``BASE BASE+ADAPTER --rank 2``: a rank-4 adapter folded in, then extracted at rank 2
    (mergekit folds with peft into its required --lora-merge-cache; here a temporary folder)."""
    from test_lora import make_adapter

    python = require_peer("mergekit")
    base = build_tiny_model(tmp_path / "base", "llama", seed=0)
    make_adapter(base, tmp_path / "ad", seed=3, r=4, target_modules=["q_proj", "down_proj"])
    mk, ws, ref = tmp_path / "mk", tmp_path / "ws", f"{base}+{tmp_path / 'ad'}"
    cmd = [str(python.parent / "mergekit-extract-lora"), "--model", ref, "--base-model",
           str(base), "--out-path", str(mk), "--max-rank", "2",
           "--lora-merge-cache", str(tmp_path / "cache")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = run_cli("extract-lora", base, ref, "-o", ws, "--rank", "2", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    _assert_same_adapter(mk, ws)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ad",
        "base",
        "cache",
        "mk",
        "r.json",
        "ws",
    ]
    record = json.loads((ws / "weightsmith.json").read_text())
    assert record["lora_folds"] == [{"model": str(base), "adapter": str(tmp_path / "ad")}]


def _assert_same_adapter(mk, ws) -> None:
    a, b = load_file(mk / "adapter_model.safetensors"), load_file(ws / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (mk, ws))
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type"):
        assert ca[key] == cb[key], key
    for key in ("target_modules", "modules_to_save"):
        assert set(ca[key]) == set(cb[key]), key
    for name, t in a.items():
        if "_A" not in name:
            if "_B" not in name:
                assert torch.equal(t, b[name]), name  # saved at full rank
            continue
        b_name = name.replace("_A", "_B")
        da, db = a[b_name] @ a[name], b[b_name] @ b[name]
        assert torch.allclose(da, db, atol=1e-6, rtol=0), name
        sa = torch.linalg.svdvals(da)
        assert torch.allclose(sa, torch.linalg.svdvals(db), atol=1e-6), name
