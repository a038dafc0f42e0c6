"""`distill kd --loss uld` end to end: a tiny seeded teacher and a student with a different
tokenizer (byte-level BPE of 300 vs 262 tokens) train through the CLI; the loss and held-out
perplexity fall, the ULD term itself falls under pure ULD, the output loads; bad combinations
fail with one line before any training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import distill_cli
from weightsmith.core.models import load_tokenizer
from weightsmith.core.training.data import read_records
from weightsmith.distill import DistillConfig, LossConfig, distill
from weightsmith.distill.uld import collate_cross, cross_examples, uld_groups_sum
from weightsmith.distill.vocab import tokenizer_hash
from weightsmith.testing import build_tiny_model, train_tiny_tokenizer

FAST = ["--seq-len", "32", "--batch-size", "4", "--no-progress"]


def _run(args: list) -> object:
    return CliRunner().invoke(distill_cli, ["kd", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def xtok_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer llama whose tokenizer (262 tokens, almost bytes) differs from the teacher's."""
    path = build_tiny_model(tmp_path_factory.mktemp("xtok") / "s", "llama", seed=4,
                            num_hidden_layers=1, with_tokenizer=False)  # fmt: skip
    train_tiny_tokenizer(262).save_pretrained(path)
    return path


def test_uld_across_tokenizers_trains_through_the_cli(teacher, xtok_student, corpus, tmp_path):
    out, report = tmp_path / "out", tmp_path / "r.json"
    r = _run(["--teacher", teacher, "--student", xtok_student, "--data", corpus, "-o", out,
              "--loss", "uld", "--alpha", "0.5", "--temperature", "1", "--steps", "10",
              "--lr", "1e-2", "--eval-data", corpus, "--report", report, *FAST])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "note: uld: teacher and student tokenizers differ (300 vs 262 tokens)" in r.output
    res = json.loads(report.read_text())["result"]
    losses = res["losses"]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3])
    assert res["eval_after"]["ppl"] < res["eval_before"]["ppl"]
    assert "kl_to_teacher" not in res["eval_after"]  # no shared vocabulary to compare
    prov = json.loads((out / "weightsmith.json").read_text())
    assert prov["config"]["loss"]["loss"] == "uld"
    assert prov["tokenizer_hash"] == tokenizer_hash(load_tokenizer(xtok_student))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([load_tokenizer(out)("Lily went to the park")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def _mean_uld(model_dir: Path, teacher: Path, corpus: Path) -> float:
    """Σ ULD over all aligned groups of the corpus / groups, at τ = 1 (the trained quantity)."""
    from transformers import AutoModelForCausalLM

    s_tok, t_tok = load_tokenizer(model_dir), load_tokenizer(teacher)
    cross = cross_examples(read_records(corpus), s_tok, t_tok, 32)
    batch = collate_cross(cross, s_tok.pad_token_id, t_tok.pad_token_id)
    s_model, t_model = (AutoModelForCausalLM.from_pretrained(p) for p in (model_dir, teacher))
    with torch.no_grad():
        s = s_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_ids = batch["teacher_input_ids"]
        t = t_model(input_ids=t_ids, attention_mask=batch["teacher_attention_mask"]).logits
    ids = batch["input_ids"]
    total = uld_groups_sum(s[:, :-1], ids[:, 1:], t[:, :-1], t_ids[:, 1:], batch["groups"])
    return float(total) / len(batch["groups"])


def test_pure_uld_moves_the_student_towards_the_teacher(teacher, xtok_student, corpus, tmp_path):
    """α = 0: the only signal is the teacher's, and the aligned ULD distance falls."""
    cfg = DistillConfig(loss=LossConfig(loss="uld", alpha=0.0, temperature=1.0), steps=12,
                        lr=3e-2, batch_size=4, seq_len=32)  # fmt: skip
    res = distill(teacher, xtok_student, corpus, tmp_path / "o", cfg, progress=False)
    assert res.losses[-1] < res.losses[0]
    before = _mean_uld(xtok_student, teacher, corpus)
    after = _mean_uld(tmp_path / "o", teacher, corpus)
    assert after < 0.9 * before, (before, after)


def test_uld_with_one_tokenizer_takes_the_per_position_path(teacher, student, corpus, tmp_path):
    out, report = tmp_path / "o", tmp_path / "r.json"
    r = _run(["--teacher", teacher, "--student", student, "--data", corpus, "-o", out,
              "--loss", "uld", "--steps", "2", "--report", report, *FAST])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "uld: teacher and student tokenizers differ" not in r.output
    assert json.loads(report.read_text())["result"]["steps"] == 2


def _fails(r, match: str, out: Path) -> None:
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], r.output
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--teacher-cache", "{tmp}/cache"], "--loss uld needs an online --teacher"),
        (["--lmbda", "0.5"], "--loss uld does not combine with --lmbda"),
        (["--hidden-layers", "1:1"], "--loss uld does not combine with --hidden-layers"),
    ],
)
def test_uld_refuses_what_it_cannot_align(teacher, xtok_student, corpus, tmp_path, extra, match):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    r = _run(["--teacher", teacher, "--student", xtok_student, "--data", corpus,
              "-o", tmp_path / "o", "--loss", "uld", "--steps", "2", *extra, *FAST])  # fmt: skip
    _fails(r, match, tmp_path / "o")


def test_uld_teacher_without_tokenizer_is_one_line(teacher, xtok_student, corpus, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(teacher, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    r = _run(["--teacher", bare, "--student", xtok_student, "--data", corpus,
              "-o", tmp_path / "o", "--loss", "uld", "--steps", "2", *FAST])  # fmt: skip
    _fails(r, "has no usable tokenizer", tmp_path / "o")


def test_other_losses_across_tokenizers_point_to_uld(teacher, xtok_student, corpus, tmp_path):
    r = _run(["--teacher", teacher, "--student", xtok_student, "--data", corpus,
              "-o", tmp_path / "o", "--loss", "fkl", "--steps", "2", *FAST])  # fmt: skip
    _fails(r, "give --loss uld", tmp_path / "o")
