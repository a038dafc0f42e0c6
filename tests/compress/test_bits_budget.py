"""The bit-budget solver (multiple-choice knapsack): hand-computed plans, and the exact optimum
of brute force over every assignment on small random instances (KL equal within 1e-12)."""

from __future__ import annotations

import itertools
import random

import pytest

from weightsmith.compress.bits_budget import BudgetUnit, solve_bits_budget
from weightsmith.errors import ConfigError


def brute_force(units: list[BudgetUnit], budget: float) -> float:
    """The least summed KL over every assignment that fits (inf if none)."""
    total = sum(u.params for u in units)
    best = float("inf")
    for combo in itertools.product(*(list(u.options) for u in units)):
        bits = sum(u.params * u.options[s][0] for u, s in zip(units, combo, strict=True))
        if bits <= budget * total + 1e-9:
            best = min(best, sum(u.options[s][1] for u, s in zip(units, combo, strict=True)))
    return best


def test_hand_computed_plan():
    # Two equal units, 3 or 5 bits. Budget 4: one at 5, one at 3 (KL 0.1 + 0.05 = 0.15), and
    # the sensitive unit gets the 5 bits; all-4-average plans are impossible (no 4-bit option).
    units = [
        BudgetUnit("a", 100, {"w3": (3.0, 0.10), "w5": (5.0, 0.01)}),
        BudgetUnit("b", 100, {"w3": (3.0, 0.90), "w5": (5.0, 0.05)}),
    ]
    plan = solve_bits_budget(units, 4.0)
    assert plan.choice == {"a": "w3", "b": "w5"}
    assert plan.total_kl == pytest.approx(0.15, abs=1e-12)
    assert plan.average_bpw == pytest.approx(4.0, abs=1e-12)
    assert plan.exact
    # Weighted by params: upgrading the big unit costs 2 bits x 300 = 600 > 0.5 x 400 = 200.
    units = [
        BudgetUnit("small", 100, {"w3": (3.0, 0.5), "w5": (5.0, 0.0)}),
        BudgetUnit("big", 300, {"w3": (3.0, 0.6), "w5": (5.0, 0.0)}),
    ]
    plan = solve_bits_budget(units, 3.5)
    assert plan.choice == {"small": "w5", "big": "w3"}
    assert plan.average_bpw == pytest.approx((100 * 5 + 300 * 3) / 400, abs=1e-12)


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force(seed: int):
    rng = random.Random(seed)
    bpws = [3.25, 4.125, 4.25, 5.25, 8.125]
    units = []
    for i in range(rng.randint(1, 6)):
        chosen = rng.sample(bpws, rng.randint(1, 4))
        units.append(BudgetUnit(f"u{i}", 64 * rng.randint(1, 40), {
            f"s{b}": (b, rng.random() / b) for b in chosen
        }))  # fmt: skip
    lo = sum(u.params * min(b for b, _ in u.options.values()) for u in units)
    total = sum(u.params for u in units)
    budget = lo / total + rng.random() * 3
    plan = solve_bits_budget(units, budget)
    assert plan.exact
    assert plan.total_bits <= budget * total + 1e-9
    assert plan.total_kl == pytest.approx(brute_force(units, budget), abs=1e-12)


def test_coarse_steps_still_fit():
    # With max_states tiny the costs are rounded up: the plan fits but is marked inexact.
    rng = random.Random(7)
    units = [
        BudgetUnit(f"u{i}", 1000 + 7 * i, {"a": (3.3, rng.random()), "b": (4.7, rng.random() / 9)})
        for i in range(8)
    ]  # fmt: skip
    plan = solve_bits_budget(units, 4.0, max_states=5)
    assert not plan.exact
    assert plan.total_bits <= 4.0 * sum(u.params for u in units) + 1e-9
    assert plan.total_kl >= brute_force(units, 4.0) - 1e-12


def test_bad_budgets():
    units = [BudgetUnit("a", 10, {"w3": (3.0, 0.1), "w4": (4.0, 0.0)})]
    with pytest.raises(ConfigError, match="below the cheapest plan"):
        solve_bits_budget(units, 2.5)
    with pytest.raises(ConfigError, match="positive"):
        solve_bits_budget(units, float("nan"))
    assert solve_bits_budget(units, 100.0).choice == {"a": "w4"}


def test_plan_from_a_report_by_type():
    """``--sensitivity REPORT`` of ``--by type``: the plan per type becomes one scheme per
    module of that type (exact names), and the budget range is checked on the report."""
    from weightsmith.compress.budget_plan import BudgetRequest, plan_bits_budget
    from weightsmith.compress.schemes import Scheme

    def unit(name: str, kl3: float, kl5: float) -> dict:
        mods = [f"model.layers.{i}.{name}" for i in range(2)]
        return {"name": name, "modules": mods, "params": 200, "schemes": {
            "w3g64": {"kl": kl3, "bits_per_weight": 3.25},
            "w5g64": {"kl": kl5, "bits_per_weight": 5.25},
        }}  # fmt: skip

    report = {
        "by": "type",
        "units": [unit("mlp.down_proj", 0.9, 0.1), unit("self_attn.q_proj", 0.2, 0.1)],
    }
    req = BudgetRequest(budget=4.25, schemes=(), report=report)
    outcome = plan_bits_budget("unused", req)
    assert outcome.plan.choice == {"mlp.down_proj": "w5g64", "self_attn.q_proj": "w3g64"}
    assert dict(outcome.scheme_map) == {
        "model.layers.0.mlp.down_proj": Scheme(5, 64),
        "model.layers.1.mlp.down_proj": Scheme(5, 64),
        "model.layers.0.self_attn.q_proj": Scheme(3, 64),
        "model.layers.1.self_attn.q_proj": Scheme(3, 64),
    }
    assert outcome.summary()["units_per_scheme"] == {"w5g64": 1, "w3g64": 1}
    with pytest.raises(ConfigError, match=r"3\.25 \(all cheapest\) to 5\.25 \(all dearest\)"):
        plan_bits_budget("unused", BudgetRequest(budget=6.0, schemes=(), report=report))
