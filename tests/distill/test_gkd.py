"""On-policy GKD (`distill kd --lmbda`): TRL's generalized JSD by hand and against a transcription
of TRL's formula, the student's batched rollouts, the seeded λ mix, λ = 0 bit for bit equal to
plain KD, and bad input refused before training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from weightsmith.cli.main import distill_cli
from weightsmith.core.models import load_tokenizer
from weightsmith.core.training.data import Example
from weightsmith.distill import DistillConfig, LossConfig, distill
from weightsmith.distill.gkd import (
    OnPolicyMix,
    RolloutSettings,
    completion_lengths,
    prompt_length,
    student_rollouts,
)
from weightsmith.distill.losses import (
    IGNORE_INDEX,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    trl_generalized_jsd,
)
from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint

P_T = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
P_S = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
TOL = 1e-6  # hand values rounded to 7 decimals


def _by_hand(beta: float) -> float:
    """β·KL(p_T‖M) + (1−β)·KL(p_S‖M), M = β·p_T + (1−β)·p_S, in plain floats."""
    t, s = P_T.tolist(), P_S.tolist()
    m = [beta * a + (1 - beta) * b for a, b in zip(t, s, strict=True)]
    kl_t = sum(a * math.log(a / c) for a, c in zip(t, m, strict=True))
    kl_s = sum(b * math.log(b / c) for b, c in zip(s, m, strict=True))
    return beta * kl_t + (1 - beta) * kl_s


@pytest.mark.parametrize("beta, value", [(0.25, 0.0344218), (0.5, 0.0462008), (0.9, 0.0170996)])
def test_trl_jsd_hand_values(beta, value):
    got = trl_generalized_jsd(P_S.log(), P_T.log(), beta).item()
    assert got == pytest.approx(value, abs=TOL)
    assert got == pytest.approx(_by_hand(beta), abs=1e-12)


def test_trl_jsd_endpoints_and_relation_to_jsd():
    s, t = P_S.log(), P_T.log()
    # TRL: beta 0 -> KL(teacher‖student), beta 1 -> KL(student‖teacher) (0.1837869, 0.1920420)
    assert trl_generalized_jsd(s, t, 0.0).item() == pytest.approx(0.1837869, abs=TOL)
    assert trl_generalized_jsd(s, t, 1.0).item() == pytest.approx(0.1920420, abs=TOL)
    assert torch.equal(trl_generalized_jsd(s, t, 0.0), forward_kl(s, t))
    assert torch.equal(trl_generalized_jsd(s, t, 1.0), reverse_kl(s, t))
    # TRL's interior formula vanishes near both ends (only the endpoints are the KLs) ...
    assert trl_generalized_jsd(s, t, 1e-7).item() < 1e-6
    assert trl_generalized_jsd(s, t, 1 - 1e-7).item() < 1e-6
    # ... equals weightsmith's `jsd` at 0.5 and swaps its term weights elsewhere (0.080508)
    assert trl_generalized_jsd(s, t, 0.5).item() == pytest.approx(
        generalized_jsd(s, t, 0.5).item(), abs=1e-12
    )
    assert generalized_jsd(s, t, 0.25).item() == pytest.approx(0.080508, abs=TOL)


def _trl_reference(student_logits, teacher_logits, labels, beta):
    """TRL's GKDTrainer.generalized_jsd_loss (temperature 1, batchmean over unmasked tokens),
    transcribed with F.kl_div as TRL writes it: the oracle for our per-position form."""
    s_lp, t_lp = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    if beta == 0:
        jsd = F.kl_div(s_lp, t_lp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_lp, s_lp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s_lp.dtype)
        mix = torch.logsumexp(torch.stack([s_lp + torch.log1p(-b), t_lp + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(mix, t_lp, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mix, s_lp, reduction="none", log_target=True
        )
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.8, 1.0])
def test_gkd_loss_matches_trl_formula(beta):
    """α = 0, τ = 1: our loss over completion tokens equals TRL's (masked prompt and padding)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 5, 11, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    n = int((labels != -100).sum())
    cfg = LossConfig(loss="gkd", beta=beta, alpha=0.0, temperature=1.0)
    ours = distillation_loss(s, labels, cfg, n, teacher_logits=t).loss
    # float32 inside distillation_loss (completion_ce casts): relative 1e-6
    assert ours.item() == pytest.approx(_trl_reference(s, t, labels, beta).item(), rel=1e-6)


def test_prompt_length_and_completion_lengths():
    pair = Example((1, 5, 6, 7, 8), (IGNORE_INDEX, IGNORE_INDEX, 6, 7, 8))
    text = Example(tuple(range(10, 30)), tuple(range(10, 30)))
    assert prompt_length(pair, 16) == 2  # the prompt: positions before the first label
    assert prompt_length(text, 4) == 4  # plain text: the first prompt_tokens
    assert prompt_length(Example((1, 2, 3), (1, 2, 3)), 16) == 2  # keeps one token to learn
    new = torch.tensor([[4, 2, 9, 9], [4, 5, 6, 7], [2, 2, 2, 2]])
    assert completion_lengths(new, eos_id=2).tolist() == [2, 4, 1]  # through the first EOS
    assert completion_lengths(new, eos_id=None).tolist() == [4, 4, 4]


def test_batched_greedy_rollouts_equal_one_by_one(student):
    """Left-padded batch generation == each prompt alone; labels are the generated tokens."""
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    tok = load_tokenizer(student)
    prompts = [(1, 40, 41), (1, 50, 51, 52, 53, 54), (1, 60)]
    examples = [Example((*p, 99), (*[IGNORE_INDEX] * len(p), 99)) for p in prompts]
    cfg = RolloutSettings(max_new_tokens=6, temperature=0.0, seq_len=64)
    eos = tok.eos_token_id
    got = student_rollouts(model, examples, cfg, pad_id=tok.pad_token_id, eos_id=eos, seed=0)
    for p, ex in zip(prompts, got, strict=True):
        alone = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                               max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=eos)[0, len(p):].tolist()  # fmt: skip
        if eos in alone:
            alone = alone[: alone.index(eos) + 1]
        assert ex.input_ids == (*p, *alone)
        assert ex.labels == (*[IGNORE_INDEX] * len(p), *alone)
        assert 1 <= len(alone) <= 6
    assert model.training is False  # from_pretrained: eval; restored after sampling


def test_sampled_rollouts_are_seeded_and_leave_the_global_rng_alone(student):
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    tok = load_tokenizer(student)
    ex = [Example(tuple(range(1, 21)), tuple(range(1, 21)))] * 3
    cfg = RolloutSettings(max_new_tokens=8, temperature=1.0, prompt_tokens=4, seq_len=64)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = student_rollouts(model, ex, cfg, pad_id=tok.pad_token_id, eos_id=None, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = student_rollouts(model, ex, cfg, pad_id=tok.pad_token_id, eos_id=None, seed=7)
    c = student_rollouts(model, ex, cfg, pad_id=tok.pad_token_id, eos_id=None, seed=8)
    assert a == b and a != c
    assert all(len(e.input_ids) == 4 + 8 and e.input_ids[:4] == (1, 2, 3, 4) for e in a)


def test_mix_draws_are_seeded_shared_by_ranks_and_about_lambda():
    cfg = RolloutSettings()
    r0, r1 = OnPolicyMix(0.3, cfg, seed=5, rank=0), OnPolicyMix(0.3, cfg, seed=5, rank=1)
    d0 = [r0.draw() for _ in range(4000)]
    assert d0 == [r1.draw() for _ in range(4000)]
    assert sum(d0) / len(d0) == pytest.approx(0.3, abs=0.025)  # ~4.9 sigma
    assert not any(OnPolicyMix(0.0, cfg, seed=5).draw() for _ in range(100))
    assert all(OnPolicyMix(1.0, cfg, seed=5).draw() for _ in range(100))
    with pytest.raises(ConfigError, match=r"--lmbda must be in \[0, 1\], got 1.5"):
        OnPolicyMix(1.5, cfg, seed=0)


def _weights(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as c:
        return {n: c.get_tensor(n) for n in c.tensors}


def _cfg(**kw) -> DistillConfig:
    base = dict(steps=4, lr=1e-2, batch_size=4, seq_len=32, warmup_steps=1,
                loss=LossConfig(loss="gkd", beta=0.5, alpha=0.2, temperature=1.0))  # fmt: skip
    return DistillConfig(**{**base, **kw})


def test_lmbda_zero_is_plain_kd_bit_for_bit(teacher, student, corpus, tmp_path):
    """λ = 0 never draws; a λ so small it draws but never generates consumes only its own
    generator: both equal the plain run exactly (the generation settings are then unused)."""
    plain = distill(teacher, student, corpus, tmp_path / "a", _cfg(), progress=False)
    zero = distill(teacher, student, corpus, tmp_path / "b",
                   _cfg(lmbda=0.0, gen_temperature=0.3, gen_max_new_tokens=3), progress=False)  # fmt: skip
    tiny = distill(teacher, student, corpus, tmp_path / "c", _cfg(lmbda=1e-12), progress=False)
    wa, wb, wc = (_weights(tmp_path / x) for x in "abc")
    assert plain.losses == zero.losses == tiny.losses
    assert all(torch.equal(wa[n], wb[n]) and torch.equal(wa[n], wc[n]) for n in wa)
    assert "gkd: the student generated 0 of 4 micro-batches (lmbda 1e-12)" in tiny.notes
    assert not any(n.startswith("gkd:") for n in zero.notes)


def test_on_policy_run_trains_on_student_samples(teacher, student, corpus, tmp_path):
    cfg = _cfg(lmbda=1.0, gen_max_new_tokens=8, gen_prompt_tokens=4, grad_accum=2)
    res = distill(teacher, student, corpus, tmp_path / "o", cfg, eval_data=corpus, progress=False)
    assert "gkd: the student generated 8 of 8 micro-batches (lmbda 1.0)" in res.notes
    # 8 micro-batches x 4 sequences x at most 8 generated tokens (prompt tokens not trained)
    assert 8 <= res.train_tokens <= 8 * 4 * 8
    assert all(math.isfinite(x) for x in res.losses)
    off = distill(teacher, student, corpus, tmp_path / "p", _cfg(grad_accum=2), progress=False)
    assert off.train_tokens > res.train_tokens  # the off-policy run trains on whole windows
    w_on, w_off = _weights(tmp_path / "o"), _weights(tmp_path / "p")
    assert any(not torch.equal(w_on[n], w_off[n]) for n in w_on)
    assert res.eval_after["kl_to_teacher"] < res.eval_before["kl_to_teacher"]


def test_bad_lmbda_inputs_are_refused_before_training(teacher, student, corpus, tmp_path):
    with pytest.raises(ConfigError, match="needs an online --teacher"):
        distill(None, student, corpus, tmp_path / "o", _cfg(lmbda=0.5), progress=False)
    with pytest.raises(ConfigError, match="which no --teacher-cache holds"):
        distill(teacher, student, corpus, tmp_path / "o", _cfg(lmbda=0.5),
                teacher_cache=tmp_path / "cache", progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="give --alpha < 1"):
        distill(teacher, student, corpus, tmp_path / "o",
                _cfg(lmbda=0.5, loss=LossConfig(alpha=1.0)), progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="is for distill kd, not sft"):
        DistillConfig(method="sft", lmbda=0.5)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_cli_lmbda_out_of_range_is_one_line_error(teacher, tmp_path, value):
    r = CliRunner().invoke(distill_cli, ["kd", "--teacher", str(teacher), "--student",
                           str(tmp_path / "missing"), "--data", str(tmp_path / "missing.txt"),
                           "-o", str(tmp_path / "o"), "--lmbda", value])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [
        f"error: --lmbda must be in [0, 1], got {float(value)}"
    ]
    assert not (tmp_path / "o").exists()
