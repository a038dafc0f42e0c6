"""``merge extract-lora``: truncated SVD of each Linear delta, written as a PEFT adapter.

Numbers checked: a delta of known rank r with known singular values is recovered exactly
(1e-5) at rank >= r; at rank k < r each folded-back weight's error is the Frobenius norm of the
dropped singular values (1e-4 relative); peft loads the adapter and its merged model gives
FT's logits (full rank, 1e-4); on the real stories260K pair every Linear's error equals its own
SVD truncation bound.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from merge_testlib import assert_one_line_error, run_cli, tensors
from safetensors.torch import load_file, save_file

from weightsmith.merge.extract_lora import decompose
from weightsmith.testing import build_tiny_model, shared_model

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SV = torch.tensor([0.8, 0.4, 0.2, 0.1, 0.05], dtype=torch.float64)  # known singular values


def _is_linear(name: str) -> bool:
    return any(f".{m}." in name for m in LINEAR)


def _low_rank(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """U diag(SV) Vᵀ with random orthonormal U, V: singular values exactly SV."""
    r = SV.numel()
    u, _ = torch.linalg.qr(torch.randn(shape[0], r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r, generator=gen, dtype=torch.float64))
    return u @ torch.diag(SV) @ v.T


@pytest.fixture(scope="module")
def known_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(base, ft) where ft = base + a rank-5 delta with singular values SV on every Linear;
    every other tensor equal."""
    root = tmp_path_factory.mktemp("known")
    base = build_tiny_model(root / "base", "llama", seed=0, max_shard_size="10MB")
    ft = root / "ft"
    shutil.copytree(base, ft)
    gen = torch.Generator().manual_seed(7)
    for shard in ft.glob("*.safetensors"):
        state = load_file(shard)
        for name in sorted(state):
            if _is_linear(name):
                w = state[name]
                state[name] = (w.double() + _low_rank(tuple(w.shape), gen)).float()
        save_file(state, shard, metadata={"format": "pt"})
    return base, ft


def _fold(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    r = run_cli("lora", base, adapter, "-o", out)
    assert r.exit_code == 0, r.output
    return tensors(out)


def test_decompose_hand_values():
    """D = [[3, 0], [0, 4]]: s = (4, 3); rank 1 keeps 4 e2 e2ᵀ; √S split between A and B."""
    d = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    full = decompose(d, 2)
    assert torch.allclose(full.singular_values, torch.tensor([4.0, 3.0]))
    assert torch.allclose(full.b @ full.a, d, atol=1e-6)
    one = decompose(d, 1)
    assert torch.allclose(one.b @ one.a, torch.tensor([[0.0, 0.0], [0.0, 4.0]]), atol=1e-6)
    assert torch.allclose(one.a.abs(), torch.tensor([[0.0, 2.0]]), atol=1e-6)  # √4
    nodist = decompose(d, 1, distribute_scale=False)
    assert torch.allclose(nodist.a.abs(), torch.tensor([[0.0, 4.0]]), atol=1e-6)
    assert decompose(d, 2, sv_epsilon=3.5).a.shape == (1, 2)  # 3 <= ε dropped
    emb = decompose(d.T @ torch.ones(2, 3) * 0 + torch.arange(6.0).view(2, 3), 3, transpose=True)
    assert torch.allclose(emb.b @ emb.a, torch.arange(6.0).view(2, 3).T, atol=1e-5)


@pytest.mark.parametrize("rank", [5, 8])
def test_known_rank_recovered_exactly(known_pair, tmp_path, rank):
    base, ft = known_pair
    report = tmp_path / "report.json"
    r = run_cli("extract-lora", base, ft, "-o", tmp_path / "ad", "--rank", rank, "--report", report)
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("extracted LoRA: 14 modules")
    rep = json.loads(report.read_text())
    assert rep["ok"] and rep["result"]["lora_modules"] == 14 and rep["result"]["max_rank"] == rank
    assert rep["result"]["retained_energy"] == pytest.approx(1.0, abs=1e-9)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["lora_alpha"] == rank  # ranks are min(rank, 64) = rank
    merged, want = _fold(base, tmp_path / "ad", tmp_path / "m"), tensors(ft)
    assert merged.keys() == want.keys()
    for name, w in want.items():
        assert torch.allclose(merged[name], w, atol=1e-5, rtol=0), name


@pytest.mark.parametrize("k", [1, 3])
def test_truncation_error_is_the_svd_bound(known_pair, tmp_path, k):
    base, ft = known_pair
    r = run_cli("extract-lora", base, ft, "-o", tmp_path / "ad", "--rank", k)
    assert r.exit_code == 0, r.output
    merged, want = _fold(base, tmp_path / "ad", tmp_path / "m"), tensors(ft)
    bound = math.sqrt(float((SV[k:] ** 2).sum()))
    energy = float((SV[:k] ** 2).sum() / (SV**2).sum())
    assert f"{100 * energy:.2f}% of the delta energy" in r.output
    for name, w in want.items():
        err = float((merged[name].double() - w.double()).norm())
        if _is_linear(name):
            assert err == pytest.approx(bound, rel=1e-4), name
        else:
            assert err == 0.0, name  # embeddings, norms, lm_head saved at full rank


def test_sv_epsilon_gives_per_module_ranks(known_pair, tmp_path):
    """ε between SV[2] and SV[1] keeps 2 values; peft's rank_pattern records nothing when
    every module has that rank, and the fold-back error is the bound of 3 dropped values."""
    base, ft = known_pair
    out = tmp_path / "ad"
    r = run_cli("extract-lora", base, ft, "-o", out, "--rank", 4, "--sv-epsilon", 0.3)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["rank_pattern"] == {}
    name = "model.layers.0.self_attn.q_proj.weight"
    merged = _fold(base, out, tmp_path / "m")
    err = float((merged[name].double() - tensors(ft)[name].double()).norm())
    assert err == pytest.approx(math.sqrt(float((SV[2:] ** 2).sum())), rel=1e-4)


def test_peft_loads_the_adapter(tiny_model, tmp_path):
    """peft's merged model = FT's logits (full rank, 1e-4); at rank 3 peft's merged weights
    are weightsmith's fold-back (1e-6)."""
    peft = pytest.importorskip("peft")
    import transformers

    base, ft = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = torch.tensor([[1, 5, 9, 33, 200, 17, 3]])

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    want = logits(transformers.AutoModelForCausalLM.from_pretrained(ft))
    for rank in (64, 3):
        out = tmp_path / f"ad{rank}"
        r = run_cli("extract-lora", base, ft, "-o", out, "--rank", rank)
        assert r.exit_code == 0, r.output
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload()
        if rank == 64:
            assert torch.allclose(logits(merged), want, atol=1e-4, rtol=0)
        else:
            ours = _fold(base, out, tmp_path / "m")
            state = merged.state_dict()
            for name, w in ours.items():
                assert torch.allclose(state[name], w, atol=1e-6, rtol=0), name
            assert (logits(merged) - want).abs().max() > 2e-4  # rank 3 is not the fine-tune


def test_stories260k_pair(tmp_path):
    base, ft = shared_model("stories260K"), shared_model("stories260K-shakespeare")
    if base is None or ft is None:
        pytest.skip("../shared/models/stories260K(-shakespeare) not found (WEIGHTSMITH_SHARED)")
    out = tmp_path / "ad"
    r = run_cli("extract-lora", base, ft, "-o", out, "--rank", 8)
    assert r.exit_code == 0, r.output
    merged, b, f = _fold(base, out, tmp_path / "m"), tensors(base), tensors(ft)
    assert merged.keys() == f.keys()
    for name, w in f.items():
        err = float((merged[name].double() - w.double()).norm())
        if _is_linear(name):
            s = torch.linalg.svdvals((w - b[name]).double())
            assert err == pytest.approx(float(s[8:].norm()), rel=1e-4, abs=1e-6), name
        else:
            assert err == 0.0, name  # tied embedding and norms: saved at full rank


def test_bad_inputs_write_nothing(tiny_model, tmp_path):
    base = tiny_model("llama", seed=0)
    out = tmp_path / "ad"
    r = run_cli("extract-lora", base, tiny_model("llama", seed=1), "-o", out, "--rank", 0)
    assert_one_line_error(r, "--rank must be >= 1")
    wide = build_tiny_model(tmp_path / "wide", "llama", seed=1, intermediate_size=96)
    assert_one_line_error(run_cli("extract-lora", base, wide, "-o", out), "shape")
    other = tiny_model("gpt2", seed=1)
    assert_one_line_error(run_cli("extract-lora", base, other, "-o", out), "gpt2")
    r = run_cli("extract-lora", base, base, "-o", out, "-i", "(")
    assert_one_line_error(r, "invalid regex")
    assert not out.exists()
    (out).mkdir()
    r = run_cli("extract-lora", base, tiny_model("llama", seed=1), "-o", out)
    assert r.exit_code == 1 and not (out / "adapter_config.json").exists()
