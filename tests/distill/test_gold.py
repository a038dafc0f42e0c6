"""`--loss gold` (TRL GOLD's hybrid across tokenizers): token texts, the vocabulary map, the
hybrid distance on hand-made distributions, and `distill kd --loss gold` end to end with a
byte-level teacher and a sentencepiece-style student. Tolerance 1e-6 (float32 on values of
order 1) unless stated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from weightsmith.cli.main import distill_cli
from weightsmith.distill.gold import GoldSettings, build_vocab_map, token_surfaces
from weightsmith.distill.losses import generalized_jsd, gold_distance
from weightsmith.errors import ConfigError
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TOKENIZER_CORPUS

FAST = ["--seq-len", "32", "--batch-size", "4", "--no-progress"]


def _fast(vocab: dict[str, int], kind: str, special: list[str]):
    """A fast tokenizer over a fixed vocabulary: byte-level BPE or sentencepiece-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=kind == "sp"))
    if kind == "bytes":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:  # llama's sentencepiece decoder, as transformers converts it
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=special)


# teacher: byte-level ("Ġ" = space, "Ã©" = the two bytes of "é", "Ã" alone = half of it)
T_VOCAB = {"Ġthe": 0, "the": 1, "Ġthere": 2, "A": 3, "Ã©": 4, "<|end|>": 5, "Ã": 6, "b": 7}
# student: sentencepiece ("▁" = space, <0xNN> byte fallback)
S_VOCAB = {"<s>": 0, "<0x41>": 1, "<0x62>": 2, "<0xC3>": 3, "▁the": 4, "the": 5, "▁t": 6,
           "é": 7, "b": 8}  # fmt: skip


@pytest.fixture(scope="module")
def hand_tokenizers():
    return _fast(S_VOCAB, "sp", ["<s>"]), _fast(T_VOCAB, "bytes", ["<|end|>"])


def test_token_surfaces_hand_values(hand_tokenizers):
    s_tok, t_tok = hand_tokenizers
    # byte-level: Ġ -> space, Ã© -> é; "Ã" is half a character (no text); special dropped
    assert token_surfaces(t_tok) == {0: " the", 1: "the", 2: " there", 3: "A", 4: "é", 7: "b"}
    # sentencepiece: ▁ -> space; <0x41> stands for "A" (no other "A"); <0x62> is dropped for
    # the ordinary "b"; <0xC3> is half a character; <s> special
    assert token_surfaces(s_tok) == {1: "A", 4: " the", 5: "the", 6: " t", 7: "é", 8: "b"}


def test_vocab_map_exact_and_prefix(hand_tokenizers):
    s_tok, t_tok = hand_tokenizers
    exact = build_vocab_map(s_tok, t_tok, t_width=9, mode="exact")  # 9: one padded row
    assert exact.teacher_to_student.tolist() == [4, 5, -1, 1, 7, -1, -1, 8, -1]
    assert (exact.matched_teacher, exact.shared_student) == (5, 5)
    prefix = build_vocab_map(s_tok, t_tok, t_width=9, mode="prefix")
    # " there" -> the student's longest token that begins it: " the" (not " t")
    assert prefix.teacher_to_student.tolist() == [4, 5, 4, 1, 7, -1, -1, 8, -1]
    assert (prefix.matched_teacher, prefix.shared_student) == (6, 5)


def test_vocab_map_with_nothing_shared_is_one_line(hand_tokenizers):
    s_tok, _ = hand_tokenizers
    other = _fast({"Ωx": 0, "Ψ": 1}, "bytes", [])  # neither text is a student token's text
    with pytest.raises(ConfigError, match="share no token by text"):
        build_vocab_map(s_tok, other, t_width=2)


def test_gold_distance_hand_value():
    # student V=3 (ids 0, 1 shared), teacher V=4: t0 -> s1, t1 -> s0, t2, t3 unmatched
    s = torch.tensor([[0.5, 0.3, 0.2]]).log()
    t = torch.tensor([[0.1, 0.4, 0.3, 0.2]]).log()
    t2s = torch.tensor([1, 0, -1, -1])
    # matched, renormalised: p_S = [.5, .3]/.8 = [.625, .375], Π p_T = [.4, .1]/.5 = [.8, .2]
    kl = 0.8 * math.log(0.8 / 0.625) + 0.2 * math.log(0.2 / 0.375)  # β = 0: KL(T ‖ S)
    # unmatched, sorted L1: student [.2, 0] vs teacher [.3, .2] -> .1 + .2
    assert gold_distance(s, t, t2s, beta=0.0).item() == pytest.approx(kl + 0.3, abs=1e-6)
    got = gold_distance(s, t, t2s, beta=0.0, matched_weight=2.0, unmatched_weight=0.5).item()
    assert got == pytest.approx(2 * kl + 0.15, abs=1e-6)
    # many to one: t0 and t2 both onto s1 -> Π p_T = [.4, .1 + .3]/.8 = [.5, .5]
    t2s = torch.tensor([1, 0, 1, -1])
    kl = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    # unmatched: student [.2] vs teacher [.2] -> 0
    assert gold_distance(s, t, t2s, beta=0.0).item() == pytest.approx(kl, abs=1e-6)


def test_gold_distance_scale_invariant_on_matched_and_jsd_when_all_match():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 6, generator=g).log_softmax(-1)
    t = torch.randn(5, 6, generator=g).log_softmax(-1)
    ident = torch.arange(6)
    ref = generalized_jsd(s, t, 0.3)
    torch.testing.assert_close(gold_distance(s, t, ident, 0.3), ref, rtol=0, atol=1e-6)
    # a merged (unnormalised) group scales a distribution: the matched term does not move
    torch.testing.assert_close(gold_distance(s - 1.7, t - 0.4, ident, 0.3), ref, rtol=0,
                               atol=1e-6)  # fmt: skip


def test_gold_distance_gradient_is_finite_and_zero_at_the_teacher():
    t = torch.tensor([[0.6, 0.3, 0.1]]).log()
    s = t.clone().requires_grad_()
    d = gold_distance(s, t, torch.tensor([0, 1, -1]), beta=0.5)
    (grad,) = torch.autograd.grad(d.sum(), s)
    assert d.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(grad).all()


def _run(args: list) -> object:
    from click.testing import CliRunner

    return CliRunner().invoke(distill_cli, ["kd", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def sp_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer llama with a sentencepiece-style tokenizer (Metaspace, 200 tokens) trained on
    the corpus: different ids and token strings from the byte-level teacher."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    path = build_tiny_model(tmp_path_factory.mktemp("sp") / "s", "llama", seed=5,
                            num_hidden_layers=1, with_tokenizer=False)  # fmt: skip
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="</s>").save_pretrained(path)  # fmt: skip
    return path


def test_gold_across_tokenizers_trains_through_the_cli(teacher, sp_student, corpus, tmp_path):
    out, report = tmp_path / "out", tmp_path / "r.json"
    r = _run(["--teacher", teacher, "--student", sp_student, "--data", corpus, "-o", out,
              "--loss", "gold", "--gold-map", "prefix", "--gold-unmatched-weight", "0.5",
              "--beta", "0", "--alpha", "0.5", "--temperature", "1", "--steps", "10",
              "--lr", "1e-2", "--eval-data", corpus, "--report", report, *FAST])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "note: gold: teacher and student tokenizers differ (300 vs 200 tokens)" in r.output
    assert "note: gold: prefix map by text:" in r.output
    res = json.loads(report.read_text())["result"]
    assert sum(res["losses"][-3:]) < sum(res["losses"][:3])
    assert res["eval_after"]["ppl"] < res["eval_before"]["ppl"]
    prov = json.loads((out / "weightsmith.json").read_text())["config"]
    assert prov["loss"]["loss"] == "gold" and prov["loss"]["beta"] == 0.0
    assert prov["gold"] == {"matched_weight": 1.0, "unmatched_weight": 0.5,
                            "vocab_map": "prefix", "version": 1}  # fmt: skip


def _fails(r, match: str, out: Path) -> None:
    assert r.exit_code != 0, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:") or "Error:" in x]
    assert len(lines) == 1 and match in lines[0], r.output
    assert not out.exists()


def test_gold_student_sharing_no_token_is_one_line(teacher, corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "Ω": 1, "Ψ": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    student = build_tiny_model(tmp_path / "s", "llama", seed=6, num_hidden_layers=1,
                               with_tokenizer=False)  # fmt: skip
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(student)  # fmt: skip
    r = _run(["--teacher", teacher, "--student", student, "--data", corpus, "-o", tmp_path / "o",
              "--loss", "gold", "--steps", "2", *FAST])  # fmt: skip
    _fails(r, "share no token by text", tmp_path / "o")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--loss", "uld", "--gold-map", "prefix"], "need --loss gold"),
        (["--loss", "gold", "--gold-matched-weight", "-1"], "must be >= 0"),
        (["--loss", "gold", "--lmbda", "0.5"], "--loss gold does not combine with --lmbda"),
    ],
)
def test_gold_bad_options(teacher, sp_student, corpus, tmp_path, extra, match):
    r = _run(["--teacher", teacher, "--student", sp_student, "--data", corpus,
              "-o", tmp_path / "o", "--steps", "2", *extra, *FAST])  # fmt: skip
    _fails(r, match, tmp_path / "o")


def test_gold_settings_with_one_tokenizer_are_refused(teacher, student, corpus, tmp_path):
    r = _run(["--teacher", teacher, "--student", student, "--data", corpus, "-o", tmp_path / "o",
              "--loss", "gold", "--gold-map", "prefix", "--steps", "2", *FAST])  # fmt: skip
    _fails(r, "share one tokenizer", tmp_path / "o")
    assert GoldSettings() == GoldSettings(1.0, 1.0, "exact")
