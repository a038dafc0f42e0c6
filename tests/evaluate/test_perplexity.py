"""Perplexity, KL and top-1 agreement against hand-computed values on tiny models."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from weightsmith.cli.main import cli
from weightsmith.errors import ConfigError
from weightsmith.evaluate import perplexity, token_windows

TEXT = (
    "Once upon a time there was a little robot who wanted to learn how to merge models. "
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. "
) * 6


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "eval.txt"
    p.write_text(TEXT)
    return p


def _zero_head_copy(src: Path, dst: Path) -> Path:
    """A copy whose lm_head is all zeros: uniform next-token distribution, ppl == vocab size."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        sd = load_file(f)
        if "lm_head.weight" in sd:
            sd["lm_head.weight"] = torch.zeros_like(sd["lm_head.weight"])
            save_file(sd, f, metadata={"format": "pt"})
    return dst


def test_token_windows():
    ids = torch.arange(10)
    assert token_windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert token_windows(ids, 4, max_tokens=7).tolist() == [[0, 1, 2, 3]]
    assert token_windows(ids, 16).tolist() == [list(range(10))]  # only window: kept whole
    with pytest.raises(ConfigError, match="seq-len"):
        token_windows(ids, 1)


def test_ppl_matches_hand_computed_nll(tiny_model, text_file):
    # Reference: a plain loop of cross-entropy over the same windows (atol 1e-5 on the NLL).
    path = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tok(TEXT)["input_ids"])
    seq = 16
    n = ids.numel() // seq
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(n):
            w = ids[k * seq : (k + 1) * seq]
            logits = model(w[None]).logits[0, :-1]
            total += F.cross_entropy(logits, w[1:], reduction="sum").item()
            count += seq - 1
    r = perplexity(path, text_file, seq_len=seq, batch_size=3)
    assert (r.tokens, r.windows) == (count, n)
    assert r.nll == pytest.approx(total / count, abs=1e-5)
    assert r.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_uniform_model_has_ppl_equal_to_vocab_and_known_kl(tiny_model, text_file, tmp_path):
    # Zero lm_head => logits 0 => ppl = V exactly, and KL(ref || uniform) = log V - H(ref).
    path = tiny_model("llama")
    uniform = _zero_head_copy(path, tmp_path / "uniform")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    r = perplexity(uniform, text_file, seq_len=32)
    assert r.ppl == pytest.approx(vocab, rel=1e-5)

    tok = AutoTokenizer.from_pretrained(path)
    ids = token_windows(torch.tensor(tok(TEXT)["input_ids"]), 32)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[:, :-1].float(), -1)
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    r = perplexity(uniform, text_file, seq_len=32, reference=path)
    assert r.kl == pytest.approx(math.log(vocab) - entropy, abs=1e-5)
    # Uniform logits: argmax is token 0 everywhere; agreement = how often the ref predicts 0.
    assert r.top1_agreement == pytest.approx((logp.argmax(-1) == 0).float().mean().item())
    self_r = perplexity(path, text_file, seq_len=32, reference=path)
    assert self_r.kl == pytest.approx(0.0, abs=1e-6) and self_r.top1_agreement == 1.0
    assert self_r.reference_ppl == pytest.approx(self_r.ppl)


def test_cli_json_and_errors(tiny_model, text_file, tmp_path):
    path = tiny_model("gpt2")
    runner = CliRunner()
    report = tmp_path / "r.json"
    res = runner.invoke(
        cli,
        ["eval", "ppl", str(path), "--data", str(text_file), "--seq-len", "16",
         "--max-tokens", "64", "--json", "--no-progress", "--report", str(report)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["tokens"] == 4 * 15 and out["ppl"] > 1
    assert json.loads(report.read_text())["result"]["ppl"] == out["ppl"]

    res = runner.invoke(cli, ["eval", "ppl", str(path), "--data", str(tmp_path / "no.txt")])
    assert res.exit_code == 1 and "error: --data" in res.output and "no such file" in res.output
    res = runner.invoke(cli, ["eval", "ppl", str(tmp_path / "nomodel"), "--data", str(text_file)])
    assert res.exit_code == 1 and "error:" in res.output
    res = runner.invoke(cli, ["eval", "ppl", str(path), "--data", str(text_file), "--seq-len", "1"])
    assert res.exit_code == 1 and "--seq-len must be at least 2" in res.output
