"""Each loss against hand-computed values (tolerances stated per assertion)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from weightsmith.core.training.schedule import lr_factor
from weightsmith.distill.losses import (
    IGNORE_INDEX,
    LossConfig,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sparse_divergence,
)

# p_T = [0.7, 0.2, 0.1], p_S = [0.4, 0.4, 0.2]; values worked out by hand:
#   KL(p_T‖p_S) = 0.7 ln(7/4) + 0.2 ln(1/2) + 0.1 ln(1/2)            = 0.1837869
#   KL(p_S‖p_T) = 0.4 ln(4/7) + 0.4 ln 2 + 0.2 ln 2                   = 0.1920420
#   β = 0.5: M = [0.55, 0.3, 0.15]
#   KL(p_T‖M) = 0.7 ln(0.7/0.55) + 0.2 ln(2/3) + 0.1 ln(2/3)          = 0.0471740
#   KL(p_S‖M) = 0.4 ln(0.4/0.55) + 0.4 ln(4/3) + 0.2 ln(4/3)          = 0.0452278
#   JSD(0.5) = (0.0471740 + 0.0452278) / 2                            = 0.0462009
P_T = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
P_S = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
FKL, RKL, JSD_HALF = 0.1837869, 0.1920420, 0.0462009
TOL = 1e-6  # the hand values are rounded to 7 decimals


def test_forward_reverse_kl_hand_values():
    assert forward_kl(P_S.log(), P_T.log()).item() == pytest.approx(FKL, abs=TOL)
    assert reverse_kl(P_S.log(), P_T.log()).item() == pytest.approx(RKL, abs=TOL)


def test_jsd_half_is_standard_jsd():
    assert generalized_jsd(P_S.log(), P_T.log(), 0.5).item() == pytest.approx(JSD_HALF, abs=TOL)


def test_jsd_beta_endpoints_are_the_kls_and_continuous():
    s, t = P_S.log(), P_T.log()
    assert generalized_jsd(s, t, 0.0).item() == pytest.approx(FKL, abs=TOL)
    assert generalized_jsd(s, t, 1.0).item() == pytest.approx(RKL, abs=TOL)
    # continuity: the interior formula tends to the endpoint values (error is O(β))
    assert generalized_jsd(s, t, 1e-7).item() == pytest.approx(FKL, abs=1e-5)
    assert generalized_jsd(s, t, 1 - 1e-7).item() == pytest.approx(RKL, abs=1e-5)


def test_jsd_mixture_weights_not_swapped():
    # β = 0.25: M = 0.25·p_T + 0.75·p_S = [0.475, 0.35, 0.175] (teacher weight β, GKD eq. 1).
    m = 0.25 * P_T + 0.75 * P_S
    expected = 0.75 * float((P_T * (P_T / m).log()).sum()) + 0.25 * float(
        (P_S * (P_S / m).log()).sum()
    )
    assert m.tolist() == pytest.approx([0.475, 0.35, 0.175], abs=1e-12)
    got = generalized_jsd(P_S.log(), P_T.log(), 0.25).item()
    assert got == pytest.approx(expected, abs=1e-12)
    swapped = 0.25 * P_S + 0.75 * P_T  # trl's pre-#3043 mixture gives a different value
    wrong = 0.75 * float((P_T * (P_T / swapped).log()).sum()) + 0.25 * float(
        (P_S * (P_S / swapped).log()).sum()
    )
    assert abs(got - wrong) > 1e-3


def _logits(p: torch.Tensor) -> torch.Tensor:
    return p.log().float()


def test_temperature_and_tau_squared():
    # alpha = 0: loss = τ² · KL(softmax(l_T/τ) ‖ softmax(l_S/τ)) / N with N = 1.
    lt = torch.tensor([[[2.0, 0.0, -1.0]]])
    ls = torch.tensor([[[0.5, 0.5, 0.0]]])
    labels = torch.tensor([[0]])
    tau = 2.0
    pt = torch.softmax(lt[0, 0].double() / tau, -1)
    ps = torch.softmax(ls[0, 0].double() / tau, -1)
    by_hand = tau**2 * float((pt * (pt / ps).log()).sum())
    cfg = LossConfig(loss="fkl", alpha=0.0, temperature=tau)
    out = distillation_loss(ls, labels, cfg, num_tokens=1, teacher_logits=lt)
    assert out.loss.item() == pytest.approx(by_hand, rel=1e-5)  # float32 compute
    # τ = 1 is plain KL
    cfg1 = LossConfig(loss="fkl", alpha=0.0, temperature=1.0)
    pt1, ps1 = torch.softmax(lt[0, 0].double(), -1), torch.softmax(ls[0, 0].double(), -1)
    kl1 = float((pt1 * (pt1 / ps1).log()).sum())
    out1 = distillation_loss(ls, labels, cfg1, num_tokens=1, teacher_logits=lt)
    assert out1.loss.item() == pytest.approx(kl1, rel=1e-5)


def test_alpha_mixes_ce_and_kd():
    lt = _logits(P_T).view(1, 1, 3)
    ls = _logits(P_S).view(1, 1, 3)
    labels = torch.tensor([[1]])  # CE = -ln 0.4 = 0.9162907
    cfg = LossConfig(loss="fkl", alpha=0.3, temperature=1.0)
    out = distillation_loss(ls, labels, cfg, num_tokens=1, teacher_logits=lt)
    assert out.loss.item() == pytest.approx(0.3 * 0.9162907 + 0.7 * FKL, abs=1e-5)
    ce_only = distillation_loss(ls, labels, LossConfig(alpha=1.0), num_tokens=1)
    assert ce_only.loss.item() == pytest.approx(0.9162907, abs=1e-5)


def test_mask_excludes_prompt_and_padding():
    torch.manual_seed(0)
    ls, lt = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 5, -100, -100]])  # 5 positions
    cfg = LossConfig(loss="jsd", beta=0.3, alpha=0.5, temperature=2.0)
    out = distillation_loss(ls, labels, cfg, num_tokens=5, teacher_logits=lt)
    assert out.tokens == 5
    # by hand: mean over the 5 labelled positions only
    keep = labels != IGNORE_INDEX
    s, t = ls[keep].double(), lt[keep].double()
    ce = F.cross_entropy(s, labels[keep], reduction="sum")
    div = generalized_jsd(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), 0.3).sum()
    expected = (0.5 * ce + 0.5 * 4.0 * div) / 5
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # changing logits at masked positions changes nothing
    ls2, lt2 = ls.clone(), lt.clone()
    ls2[~keep] += 100 * torch.randn_like(ls2[~keep])
    lt2[~keep] -= 50
    out2 = distillation_loss(ls2, labels, cfg, num_tokens=5, teacher_logits=lt2)
    assert out2.loss.item() == out.loss.item()


def test_accumulation_normalises_by_global_token_count():
    torch.manual_seed(1)
    ls = torch.randn(2, 6, 5, requires_grad=True)
    lt = torch.randn(2, 6, 5)
    labels = torch.tensor([[-100, 1, 2, 3, 4, 0], [-100, -100, -100, -100, 2, -100]])  # 5 + 1
    cfg = LossConfig(loss="fkl", alpha=0.5, temperature=2.0)
    full = distillation_loss(ls, labels, cfg, num_tokens=6, teacher_logits=lt)
    (g_full,) = torch.autograd.grad(full.loss, ls)
    micro = [
        distillation_loss(ls[i : i + 1], labels[i : i + 1], cfg, 6, teacher_logits=lt[i : i + 1])
        for i in range(2)
    ]
    summed = micro[0].loss + micro[1].loss
    (g_acc,) = torch.autograd.grad(summed, ls)
    assert summed.item() == pytest.approx(full.loss.item(), rel=1e-6)
    torch.testing.assert_close(g_acc, g_full, rtol=1e-6, atol=1e-8)
    # the naive mean of per-micro-batch means weighs the 1-token example 5x too much
    naive = (
        sum(
            distillation_loss(
                ls[i : i + 1], labels[i : i + 1], cfg, n, teacher_logits=lt[i : i + 1]
            ).loss.item()
            for i, n in ((0, 5), (1, 1))
        )
        / 2
    )
    assert abs(naive - full.loss.item()) > 1e-3


def test_sparse_divergence_with_full_k_equals_full_and_is_a_lower_bound():
    torch.manual_seed(2)
    s = F.log_softmax(torch.randn(4, 9, dtype=torch.float64), -1)
    t = F.log_softmax(torch.randn(4, 9, dtype=torch.float64) * 2, -1)
    for loss in ("fkl", "rkl", "jsd"):
        full = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": generalized_jsd}[loss](s, t, 0.5)
        ids = t.argsort(-1, descending=True)
        all_k = sparse_divergence(
            loss, s, ids, t.gather(-1, ids), torch.full((4,), -math.inf, dtype=t.dtype), 0.5
        )
        torch.testing.assert_close(all_k, full, rtol=1e-10, atol=1e-12)
        k = 3
        top = ids[:, :k]
        tail = torch.logsumexp(t.scatter(-1, top, -math.inf), -1)
        sparse = sparse_divergence(loss, s, top, t.gather(-1, top), tail, 0.5)
        assert bool((sparse <= full + 1e-12).all()) and bool((sparse >= 0).all())


def test_sparse_top1_hand_value():
    # teacher top-1 token 0 with p = 0.7, tail 0.3; student p = [0.4, 0.4, 0.2] -> [0.4 | 0.6]
    # KL = 0.7 ln(0.7/0.4) + 0.3 ln(0.3/0.6) = 0.3917311 - 0.2079442 = 0.1837869
    val = sparse_divergence(
        "fkl",
        P_S.log(),
        torch.tensor([0]),
        torch.tensor([math.log(0.7)], dtype=torch.float64),
        torch.tensor(math.log(0.3), dtype=torch.float64),
    )
    assert val.item() == pytest.approx(0.1837869, abs=TOL)


def test_sparse_gradients_are_finite():
    s_logits = torch.randn(3, 8, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    logp = torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.1], [0.9, 0.05]]))
    tail = torch.log(torch.tensor([0.2, 0.3, 0.05]))
    for loss in ("fkl", "rkl", "jsd"):
        d = sparse_divergence(loss, F.log_softmax(s_logits, -1), ids, logp, tail, 0.5).sum()
        (g,) = torch.autograd.grad(d, s_logits)
        assert torch.isfinite(g).all()


def test_loss_config_validation():
    with pytest.raises(ValueError, match="unknown loss"):
        LossConfig(loss="mse")
    with pytest.raises(ValueError, match="alpha"):
        LossConfig(alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        LossConfig(temperature=0)


def test_lr_schedule_warmup_then_cosine():
    # 10 steps, 2 warm-up: 0.5, 1.0, then cos from 1 down to 0 over the remaining 8.
    f = [lr_factor(s, 10, 2) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0)
    assert f[6] == pytest.approx(0.5)  # halfway through the decay: (1 + cos(π/2)) / 2
    assert lr_factor(10, 10, 2) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(10, 10, 2, min_ratio=0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[1:]))
