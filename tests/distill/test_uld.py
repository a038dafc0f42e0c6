"""ULD (cross-tokenizer logit KD): the distance, the text alignment, the group merging and the
loss, on hand-computed values and against a full-sort oracle. Tolerances: 1e-6 (float32
arithmetic on values of order 1) unless stated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weightsmith.core.models import load_tokenizer
from weightsmith.core.training.data import read_records, tokenize_records
from weightsmith.distill.losses import DIVERGENCES, LossConfig, distillation_loss, uld_distance
from weightsmith.distill.uld import (
    align_spans,
    collate_cross,
    cross_examples,
    merged_logprobs,
    trainable_groups,
    uld_groups_sum,
)
from weightsmith.testing import train_tiny_tokenizer


def _oracle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The paper's recipe literally: full sorts, zero padding to the wider vocabulary, L1."""
    width = max(s.shape[-1], t.shape[-1])
    s = F.pad(s.sort(-1, descending=True).values, (0, width - s.shape[-1]))
    t = F.pad(t.sort(-1, descending=True).values, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)


def test_uld_distance_hand_value():
    # sorted: s = [.5, .3, .2, 0], t = [.6, .2, .1, .1] -> .1 + .1 + .1 + .1
    s, t = torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    assert uld_distance(s, t).item() == pytest.approx(0.4, abs=1e-6)
    assert uld_distance(t, s).item() == pytest.approx(0.4, abs=1e-6)  # symmetric


def test_uld_distance_ignores_token_identity():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    assert uld_distance(p, p[:, [2, 0, 1]]).item() == pytest.approx(0.0, abs=1e-7)
    # the same distribution spread over a wider vocabulary with zeros is at distance 0 too
    assert uld_distance(p, torch.tensor([[0.0, 0.1, 0.0, 0.7, 0.2]])).item() < 1e-7


@pytest.mark.parametrize("vs,vt", [(7, 7), (5, 11), (11, 5)])
def test_uld_distance_matches_full_sort_oracle_and_gradient(vs, vt):
    g = torch.Generator().manual_seed(vs * 100 + vt)
    s = torch.randn(6, vs, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
    t = torch.randn(6, vt, generator=g, dtype=torch.float64).softmax(-1) * 0.9  # unnormalised
    ours = uld_distance(s, t)
    ref = _oracle(s, t)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    (g1,) = torch.autograd.grad(ours.sum(), s)
    (g2,) = torch.autograd.grad(ref.sum(), s)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)


def test_uld_divergence_in_the_kd_loss():
    """Same vocabulary: --loss uld is α·CE + (1−α)·τ²·Σ ULD over positions, / N."""
    assert "uld" in DIVERGENCES
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g)
    labels = torch.tensor([[1, -100, 4]])
    cfg = LossConfig(loss="uld", alpha=0.25, temperature=2.0)
    parts = distillation_loss(s_logits, labels, cfg, 2, teacher_logits=t_logits)
    keep = [0, 2]
    d = _oracle((s_logits[0, keep] / 2).softmax(-1), (t_logits[0, keep] / 2).softmax(-1)).sum()
    ce = F.cross_entropy(s_logits[0, keep], labels[0, keep], reduction="sum")
    assert parts.loss.item() == pytest.approx(((0.25 * ce + 0.75 * 4 * d) / 2).item(), abs=1e-6)


def test_align_spans_hand_example():
    # student: BOS(0,0) "Once"(0,4) " upon"(4,9) " a"(9,11); teacher: "On"(0,2) "ce"(2,4)
    # " upon a"(4,11): groups close at characters 4 and 11
    s = [(0, 0), (0, 4), (4, 9), (9, 11)]
    t = [(0, 2), (2, 4), (4, 11)]
    assert align_spans(s, t) == [(0, 1, 0, 1), (2, 3, 2, 2)]
    # an unclosed remainder (a trailing zero-width EOS on one side only) is dropped
    assert align_spans([*s, (11, 11)], t) == [(0, 1, 0, 1), (2, 3, 2, 2)]
    assert align_spans([(0, 3)], [(0, 2)]) == []


def test_trainable_groups_drop_unpredicted_tokens():
    groups = [(0, 1, 0, 1), (2, 3, 2, 2), (4, 4, 3, 4), (5, 5, 5, 5)]
    labels = (7, 8, -100, 9, 10, 11)  # token 2 is prompt: group 1 goes
    # group 0 holds token 0 (never predicted); group 3's teacher token 5 lies past t_len = 5
    assert trainable_groups(groups, labels, 1, 5) == [(4, 4, 3, 4)]
    assert trainable_groups(groups, labels, 4, 6) == [(5, 5, 5, 5)]  # teacher prompt is 0..3


def test_merged_logprobs_hand_value():
    # rows (predicting tokens 1, 2, 3): [.6, .4], [.9, .1], [.5, .5]; tokens 1..3 = 1, 0, 1
    probs = torch.tensor([[[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]]])
    targets = torch.tensor([[1, 0, 1]])
    groups = torch.tensor([[0, 1, 2], [0, 3, 3]])  # tokens 1..2 merged, token 3 alone
    out = merged_logprobs(probs.log(), targets, groups).exp()
    # group 1..2: p(· | <1) × p(token 2 = 0 | <2) = [.6, .4] × .9
    torch.testing.assert_close(out, torch.tensor([[0.54, 0.36], [0.5, 0.5]]), rtol=0, atol=1e-6)


def test_uld_groups_sum_hand_value():
    # student rows: [.6, .4], [.9, .1] (V_S = 2); teacher row: [.2, .5, .3] (V_T = 3)
    s_logits = torch.tensor([[[0.6, 0.4], [0.9, 0.1]]]).log()
    t_logits = torch.tensor([[[0.2, 0.5, 0.3]]]).log()
    s_targets, t_targets = torch.tensor([[1, 0]]), torch.tensor([[1]])
    # one group: student tokens 1..2 ([.54, .36] merged), teacher token 1 ([.5, .3, .2] sorted)
    groups = torch.tensor([[0, 1, 2, 1, 1]])
    got = uld_groups_sum(s_logits, s_targets, t_logits, t_targets, groups, 1.0)
    assert got.item() == pytest.approx(abs(0.54 - 0.5) + abs(0.36 - 0.3) + 0.2, abs=1e-6)
    # at τ = 2 both sides are softened before merging (checked against the oracle)
    s2, t2 = (s_logits / 2).softmax(-1), (t_logits / 2).softmax(-1)
    merged = s2[0, 0] * s2[0, 1, 0]
    want = _oracle(merged[None], t2[0, 0][None]).item()
    got2 = uld_groups_sum(s_logits, s_targets, t_logits, t_targets, groups, 2.0).item()
    assert got2 == pytest.approx(want, abs=1e-6)


def test_same_tokenizer_alignment_is_one_to_one_and_matches_per_position_uld(corpus):
    """With one tokenizer on both sides the groups pair each position with itself, so the
    aligned loss equals the per-position ULD divergence (the oracle)."""
    tok = train_tiny_tokenizer(300)
    records = read_records(corpus)
    cross = cross_examples(records, tok, tok, 24)
    assert [x.student for x in cross] == tokenize_records(records, tok, 24)
    x = cross[1]
    assert x.teacher_ids == x.student.input_ids
    assert [g for g in x.groups] == [(i, i, i, i) for i in range(1, len(x.teacher_ids))]
    g = torch.Generator().manual_seed(1)
    n = len(x.teacher_ids)
    s_logits, t_logits = torch.randn(1, n - 1, 300, generator=g), torch.randn(1, n - 1, 300)
    ids = torch.tensor([x.student.input_ids])
    batch = collate_cross([x], 1, 1)
    got = uld_groups_sum(s_logits, ids[:, 1:], t_logits, ids[:, 1:], batch["groups"], 1.0)
    want = _oracle(s_logits[0].softmax(-1), t_logits[0].softmax(-1)).sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_cross_examples_pair_the_same_text(teacher, corpus):
    """Different tokenizers (byte-level BPE of 262 vs 300 tokens): the student windows are
    exactly tokenize_records', and every group covers the same text on both sides."""
    s_tok, t_tok = train_tiny_tokenizer(262), load_tokenizer(teacher)
    records = read_records(corpus)
    cross = cross_examples(records, s_tok, t_tok, 32)
    assert [x.student for x in cross] == tokenize_records(records, s_tok, 32)
    merged = 0
    for x in cross:
        assert x.groups, "every window aligns somewhere"
        for sa, sb, ta, tb in x.groups:
            s_text = s_tok.decode(x.student.input_ids[sa : sb + 1])
            assert s_text == t_tok.decode(x.teacher_ids[ta : tb + 1])
            merged += (sb > sa) or (tb > ta)
    assert merged > 0  # the two tokenizers split some words differently


def test_cross_examples_pairs_train_on_the_completion_only(teacher, pairs_jsonl):
    s_tok, t_tok = train_tiny_tokenizer(262), load_tokenizer(teacher)
    cross = cross_examples(read_records(pairs_jsonl), s_tok, t_tok, 64)
    x = cross[0]
    prompt = len(s_tok("Q: who went to the park?")["input_ids"])
    assert all(g[0] >= prompt for g in x.groups)
    text = "".join(s_tok.decode(x.student.input_ids[a : b + 1]) for a, b, _, _ in x.groups)
    # the whole completion is covered, and both sides' EOS (zero-width, at its end) pair up
    assert text == " Lily and Tom went to the park.<|endoftext|>"
    assert x.groups[-1][1] == len(x.student.input_ids) - 1
    assert x.groups[-1][3] == len(x.teacher_ids) - 1
    assert x.teacher_ids[-1] == t_tok.eos_token_id
