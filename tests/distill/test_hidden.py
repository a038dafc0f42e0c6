"""Hidden-state KD (`distill kd --hidden-layers`): the losses by hand, layer-pair parsing and
range checks, the seeded projection, the first step's loss of a real run against a hand
computation, and bad input refused before training."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import distill_cli
from weightsmith.core.models import load_tokenizer
from weightsmith.core.training.data import collate, read_records, tokenize_records
from weightsmith.core.training.engine import micro_batches
from weightsmith.distill import DistillConfig, LossConfig, distill
from weightsmith.distill.hidden import (
    HiddenProjector,
    HiddenSettings,
    check_layer_pairs,
    hidden_cosine,
    hidden_mse,
    hidden_state_loss,
    parse_layer_pairs,
)
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint
from weightsmith.testing import build_tiny_model


def test_hidden_losses_hand_values():
    s = torch.tensor([[1.0, 2.0], [1.0, 0.0], [2.0, 2.0]])
    t = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    # mse: mean over the hidden dim of the squared difference: (4 + 4)/2, (4 + 0)/2, (1 + 1)/2
    assert hidden_mse(s, t).tolist() == pytest.approx([4.0, 2.0, 1.0], abs=1e-7)
    # cosine: 1 − 3/(√5·3) = 1 − 1/√5; opposite -> 2; parallel -> 0
    assert hidden_cosine(s, t).tolist() == pytest.approx([1 - 1 / math.sqrt(5), 2.0, 0.0], abs=1e-6)


def test_parse_layer_pairs():
    assert parse_layer_pairs("1:2, 3:4") == ((1, 2), (3, 4))
    assert parse_layer_pairs("0:0") == ((0, 0),)
    for bad in ("1-2", "a:b", "1:2:3", "1:", "-1:2", ""):
        with pytest.raises(ConfigError, match="expected student:teacher layer pairs"):
            parse_layer_pairs(bad)
    with pytest.raises(ConfigError, match="given twice"):
        parse_layer_pairs("1:2,1:2")


def test_layer_pair_range_check():
    check_layer_pairs([(0, 0), (2, 5)], student_layers=2, teacher_layers=5)  # 0..L inclusive
    with pytest.raises(ConfigError, match=r"the student has 2 layers, so its hidden states are "
                       r"0\.\.2 .*; 3 is out of range"):  # fmt: skip
        check_layer_pairs([(3, 1)], 2, 5)
    with pytest.raises(ConfigError, match=r"the teacher has 5 layers.*6 is out of range"):
        check_layer_pairs([(1, 6)], 2, 5)


def test_settings_validation():
    with pytest.raises(ConfigError, match="--hidden-weight must be positive"):
        HiddenSettings(((1, 1),), weight=0.0)
    with pytest.raises(ConfigError, match="--hidden-loss 'l1'"):
        HiddenSettings(((1, 1),), loss="l1")
    with pytest.raises(ConfigError, match="is for distill kd, not sft"):
        DistillConfig(method="sft", hidden=HiddenSettings(((1, 1),)))


def test_projector_identity_when_widths_agree_and_seeded_otherwise():
    assert len(list(HiddenProjector(2, 8, 8, seed=0).parameters())) == 0
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a, b = HiddenProjector(2, 4, 6, seed=3), HiddenProjector(2, 4, 6, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    assert [p.shape for p in a.parameters()] == [torch.Size([6, 4])] * 2
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert float(a.maps[0].weight.detach().abs().max()) <= 0.5  # nn.Linear's bound 1/√4


def test_hidden_state_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    s_states = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]  # student: 2 layers, D=3
    t_states = [torch.randn(2, 4, 5, generator=g) for _ in range(4)]  # teacher: 3 layers, D=5
    mask = torch.tensor([[True, True, False], [False, True, True]])  # shifted: T' = 3
    settings = HiddenSettings(((1, 2), (2, 3)), loss="mse")
    proj = HiddenProjector(2, 3, 5, seed=0)
    got = hidden_state_loss(s_states, t_states, mask, settings, proj)
    expected = 0.0
    for i, (s, t) in enumerate(settings.pairs):
        w = proj.maps[i].weight
        for b, pos in ((0, 0), (0, 1), (1, 1), (1, 2)):
            diff = w @ s_states[s][b, pos] - t_states[t][b, pos]
            expected += float((diff**2).mean().detach()) / 2  # mean over the 2 pairs
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got.backward()  # the projection is trained by this loss
    assert proj.maps[0].weight.grad is not None and proj.maps[0].weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def narrow_student(tmp_path_factory):
    """1 layer of width 32 (the teacher has 2 of width 64), same tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("narrow") / "s", "llama", seed=4,
                            num_hidden_layers=1, hidden_size=32, intermediate_size=64)  # fmt: skip


def _cfg(**kw) -> DistillConfig:
    base = dict(steps=3, lr=1e-2, batch_size=4, seq_len=32, warmup_steps=1,
                loss=LossConfig(alpha=1.0))  # fmt: skip
    return DistillConfig(**{**base, **kw})


def test_first_step_adds_the_hand_computed_hidden_loss(teacher, narrow_student, corpus, tmp_path):
    """Step 0 (before any update, same batch): loss(CE + hidden) − loss(CE) = W·Σℓ/N, with
    ℓ computed here from the two models' hidden states and the seeded projection."""
    hidden = HiddenSettings(((1, 2),), weight=0.7, loss="mse")
    ce = distill(None, narrow_student, corpus, tmp_path / "ce", _cfg(), progress=False)
    hs = distill(teacher, narrow_student, corpus, tmp_path / "hs", _cfg(hidden=hidden),
                 eval_data=corpus, progress=False)  # fmt: skip
    tok = load_tokenizer(narrow_student)
    examples = tokenize_records(read_records(corpus), tok, 32)
    first = next(micro_batches(len(examples), 4, seed=0))
    batch = collate([examples[i] for i in first], tok.pad_token_id)
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        h_s = AutoModelForCausalLM.from_pretrained(narrow_student)(**kw, output_hidden_states=True)
        h_t = AutoModelForCausalLM.from_pretrained(teacher)(**kw, output_hidden_states=True)
        w = HiddenProjector(1, 32, 64, seed=0).maps[0].weight
        mask = batch["labels"][:, 1:] != -100
        diff = h_s.hidden_states[1][:, :-1][mask] @ w.T - h_t.hidden_states[2][:, :-1][mask]
        expected = 0.7 * float((diff**2).mean(-1).sum()) / int(mask.sum())
    # the result's losses are rounded to 6 decimals: the difference is good to 1e-6
    assert hs.losses[0] - ce.losses[0] == pytest.approx(expected, abs=1.5e-6)
    assert expected > 1e-3  # the check is not vacuous
    # the projection is not saved: the output has exactly the student's tensors
    with open_checkpoint(narrow_student) as a, open_checkpoint(tmp_path / "hs") as b:
        assert {n: i.shape for n, i in a.tensors.items()} == {
            n: i.shape for n, i in b.tensors.items()
        }
    assert hs.eval_after["kl_to_teacher"] < hs.eval_before["kl_to_teacher"]


def test_hidden_with_logit_kd_and_cosine_trains(teacher, student, corpus, tmp_path):
    """Same widths (no projection) and combined with the logit loss: the run differs from logit
    KD alone and its loss is the larger by the hidden term at step 0."""
    kd = LossConfig(loss="fkl", alpha=0.5, temperature=2.0)
    a = distill(teacher, student, corpus, tmp_path / "a", _cfg(loss=kd), progress=False)
    b = distill(teacher, student, corpus, tmp_path / "b",
                _cfg(loss=kd, hidden=HiddenSettings(((1, 2),), loss="cosine")), progress=False)  # fmt: skip
    assert b.losses[0] > a.losses[0]
    with open_checkpoint(tmp_path / "a") as x, open_checkpoint(tmp_path / "b") as y:
        assert any(not torch.equal(x.get_tensor(n), y.get_tensor(n)) for n in x.tensors)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--hidden-layers", "1:9"], 1,
         "error: --hidden-layers 1:9: the teacher has 2 layers, so its hidden states are 0..2 "
         "(0 = embeddings, 2 = last layer); 9 is out of range"),
        (["--hidden-layers", "1-2"], 1, "error: --hidden-layers: expected student:teacher"),
        (["--hidden-weight", "2"], 1, "--hidden-weight and --hidden-loss need --hidden-layers"),
    ],
)  # fmt: skip
def test_cli_bad_hidden_input_is_refused_before_training(teacher, student, corpus, tmp_path,
                                                         args, code, message):  # fmt: skip
    r = CliRunner().invoke(distill_cli, ["kd", "--teacher", str(teacher), "--student",
                           str(student), "--data", str(corpus), "-o", str(tmp_path / "o"),
                           "--steps", "1", "--no-progress", *args])  # fmt: skip
    assert r.exit_code == code, r.output
    assert message in r.output
    if code == 1:
        assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_hidden_with_lora_student_and_on_policy_batches(teacher, narrow_student, corpus,
                                                        tmp_path):  # fmt: skip
    """LoRA student + a projection (widths differ) + λ = 1 rollouts: trains, saves only the
    student's tensors."""
    from weightsmith.distill import LoraSettings

    cfg = _cfg(loss=LossConfig(loss="gkd", alpha=0.0, temperature=1.0), lmbda=1.0,
               gen_max_new_tokens=6, gen_prompt_tokens=4, lora=LoraSettings(r=4, dropout=0.0),
               hidden=HiddenSettings(((1, 2),), weight=0.5))  # fmt: skip
    res = distill(teacher, narrow_student, corpus, tmp_path / "o", cfg, progress=False)
    assert "gkd: the student generated 3 of 3 micro-batches (lmbda 1.0)" in res.notes
    assert all(math.isfinite(x) for x in res.losses)
    with open_checkpoint(narrow_student) as a, open_checkpoint(tmp_path / "o") as b:
        assert set(a.tensors) == set(b.tensors)
        assert any(not torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in a.tensors)
