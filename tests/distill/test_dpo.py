"""DPO: the losses against hand-computed values, the reference log-prob cache (round trip,
refusal of a mismatched cache), and training that raises held-out reward accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import distill_cli
from weightsmith.core.models import load_model, load_tokenizer
from weightsmith.distill import DistillConfig
from weightsmith.distill.dpo import DpoSettings, dpo_loss, reward_stats, sequence_logps
from weightsmith.distill.methods.dpo import split_pairs
from weightsmith.distill.preference import (
    RefLogps,
    build_ref_logps,
    pair_logps,
    read_pairs,
    tokenize_pairs,
)
from weightsmith.errors import ConfigError

# h = (πc − πr) − (refc − refr) = [1, −0.5]; β = 0.1
PC, PR = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])


@pytest.mark.parametrize(
    "loss, smoothing, expected",
    [
        # −log σ(0.1) = log(1 + e^−0.1); −log σ(−0.05) = log(1 + e^0.05)
        ("sigmoid", 0.0, [0.6443966600735709, 0.7184596480132863]),
        # 0.8·log(1 + e^−0.1) + 0.2·log(1 + e^0.1); 0.8·log(1 + e^0.05) + 0.2·log(1 + e^−0.05)
        ("sigmoid", 0.2, [0.6643966600735709, 0.7084596480132864]),
        ("hinge", 0.0, [0.9, 1.05]),  # max(0, 1 − β·h)
        ("ipo", 0.0, [16.0, 30.25]),  # (h − 1/(2β))² = (1 − 5)², (−0.5 − 5)²
    ],
)
def test_dpo_losses_hand_computed(loss, smoothing, expected):
    out = dpo_loss(PC, PR, RC, RR, DpoSettings(beta=0.1, loss=loss, label_smoothing=smoothing))
    torch.testing.assert_close(out.losses, torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.05, 0.0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.05, 0.05]), atol=1e-7, rtol=0)
    stats = reward_stats(out.chosen_rewards, out.rejected_rewards)
    assert stats["reward_accuracy"] == 0.5  # 0.05 > −0.05, 0 < 0.05
    assert stats["reward_margin"] == pytest.approx(0.025, abs=1e-7)


def test_sigmoid_gradient_pushes_chosen_up():
    pc = PC.clone().requires_grad_(True)
    dpo_loss(pc, PR, RC, RR, DpoSettings()).losses.sum().backward()
    assert (pc.grad < 0).all()  # descending the loss raises log π(chosen)


def test_sequence_logps_counts_completion_tokens_only():
    logits = torch.zeros(1, 3, 4)  # uniform: log p = −log 4 everywhere
    labels = torch.tensor([[-100, 2, 3]])
    s, n = sequence_logps(logits, labels)
    assert n.tolist() == [2] and s.item() == pytest.approx(-2 * math.log(4), abs=1e-6)


def test_settings_refuse_bad_values():
    with pytest.raises(ConfigError, match="unknown DPO --loss"):
        DpoSettings(loss="fkl")
    with pytest.raises(ConfigError, match="--beta must be positive"):
        DpoSettings(beta=0.0)


def test_split_pairs_is_seeded_and_disjoint():
    tr, ev = split_pairs(20, 0.25, seed=3)
    assert len(ev) == 5 and not set(tr) & set(ev) and sorted(tr + ev) == list(range(20))
    assert split_pairs(20, 0.25, seed=3) == (tr, ev)
    assert split_pairs(1, 0.5, 0) == ([0], [])


def test_ref_cache_round_trip(student, prefs_jsonl, tmp_path):
    info = build_ref_logps(student, prefs_jsonl, tmp_path / "ref", seq_len=48, progress=False)
    cache = RefLogps(info["output"])
    tok = load_tokenizer(student)
    direct = pair_logps(load_model(student, torch.device("cpu")),
                        tokenize_pairs(read_pairs(prefs_jsonl), tok, 48), tok.pad_token_id,
                        torch.device("cpu"), 3)  # fmt: skip
    for k, v in direct.items():
        assert cache.values[k].dtype == v.dtype
        torch.testing.assert_close(cache.values[k], v, atol=0, rtol=0)  # bit-exact float32
    assert (cache.values["chosen_logps"] < 0).all() and (cache.values["chosen_tokens"] > 0).all()


def test_mismatched_ref_cache_refused(student, teacher, prefs_jsonl, tmp_path):
    cache = tmp_path / "ref"
    build_ref_logps(student, prefs_jsonl, cache, seq_len=48, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text(prefs_jsonl.read_text().replace("happy", "glad"))
    base = ["--method", "dpo", "--student", student, "--ref-cache", cache, "--seq-len", "48",
            "--steps", "1", "--batch-size", "2", "--no-progress"]  # fmt: skip
    for extra, match in [
        (["--data", other], "built for other pairs"),
        (["--data", prefs_jsonl, "--seq-len", "40"], "built for other pairs"),
        (["--data", prefs_jsonl, "--ref", teacher], "different --ref model"),
    ]:
        out = tmp_path / "o"
        args = [str(a) for a in base + extra + ["-o", out]]
        r = CliRunner().invoke(distill_cli, args)
        assert r.exit_code == 1, r.output
        errs = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert len(errs) == 1 and match in errs[0], r.output
        assert not out.exists()


@pytest.mark.parametrize(
    "lora, min_margin", [(False, 0.05), pytest.param(True, 0.003, marks=pytest.mark.slow)]
)
def test_dpo_raises_reward_accuracy(student, prefs_jsonl, tmp_path, lora, min_margin):
    out, report = tmp_path / "out", tmp_path / "r.json"
    args = ["--method", "dpo", "--student", student, "--data", prefs_jsonl, "-o", out,
            "--steps", "12", "--lr", "5e-3" if not lora else "2e-2", "--batch-size", "4",
            "--seq-len", "48", "--eval-fraction", "0.25", "--beta", "0.1",
            "--ref-cache", tmp_path / "refc", "--report", report, "--no-progress"]  # fmt: skip
    if lora:
        args += ["--lora-r", "8", "--lora-dropout", "0"]
    r = CliRunner().invoke(distill_cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    assert "held-out reward accuracy" in r.output
    res = json.loads(report.read_text())["result"]
    assert res["eval_before"]["reward_accuracy"] == 0.0  # policy == reference: all rewards 0
    assert res["eval_after"]["reward_accuracy"] == 1.0 and res["eval_after"]["pairs"] == 3
    assert res["eval_after"]["reward_margin"] > min_margin  # LoRA starts at ΔW = 0: slower
    # −log σ(m) ≈ log 2 − m/2 for a small margin m
    assert res["eval_after"]["loss"] < res["eval_before"]["loss"] - min_margin / 4
    assert res["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (tmp_path / "refc" / "ref_logps.json").is_file()  # kept for the next run
    prov = json.loads((out / "weightsmith.json").read_text())
    assert prov["config"]["method"] == "dpo" and prov["config"]["dpo"]["beta"] == 0.1
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads


def test_dpo_rejects_kd_loss_and_teacher(student, teacher, prefs_jsonl, tmp_path):
    for extra, match in [(["--loss", "fkl"], "kd divergence"),
                         (["--teacher", teacher], "takes --ref"),
                         (["--eval-data", prefs_jsonl], "no --eval-data")]:  # fmt: skip
        r = CliRunner().invoke(distill_cli, [str(a) for a in [
            "--method", "dpo", "--student", student, "--data", prefs_jsonl, "-o",
            tmp_path / "o", "--no-progress", *extra]])  # fmt: skip
        assert r.exit_code != 0 and match in r.output, r.output
        assert not (tmp_path / "o").exists()


def test_dpo_config_default():
    assert DistillConfig(method="dpo").dpo is None  # trainer falls back to DpoSettings()


def test_read_pairs_errors(tmp_path: Path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl:1: expected 'prompt', 'chosen'"):
        read_pairs(bad)
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    with pytest.raises(ConfigError, match="identical"):
        read_pairs(bad)


def test_dpo_refuses_multi_process(monkeypatch, student, prefs_jsonl, tmp_path):
    from weightsmith.distill import distill

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="runs in one process"):
        distill(None, student, prefs_jsonl, tmp_path / "o", DistillConfig(method="dpo"))
    assert not (tmp_path / "o").exists()
