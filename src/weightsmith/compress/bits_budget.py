"""Choose one quantization scheme per unit under an average bits-per-weight budget.

The problem is a multiple-choice knapsack: each unit (a Linear, a decoder layer, or a module
type) has ``params`` weights and candidate schemes with a storage cost (bits per weight) and a
measured damage (KL divergence to the original model when only that unit is quantized).
**Additivity assumption:** the damage of a plan is taken to be the *sum* of the units' measured
KLs, as if quantization errors of different units did not interact. That is a first-order
approximation (it holds for small, independent perturbations); it is what makes the problem
separable and the plan cheap to compute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from weightsmith.errors import ConfigError


@dataclass(frozen=True)
class BudgetUnit:
    """A unit to assign a scheme to: ``options[scheme] = (bits_per_weight, kl)``."""

    name: str
    params: int
    options: Mapping[str, tuple[float, float]]


@dataclass(frozen=True)
class BudgetPlan:
    """The chosen scheme per unit, its summed KL and its average bits per weight.

    ``exact`` is False when the budget had to be discretised coarser than the costs (each cost
    rounded up, so the plan still fits the budget but may not be the optimum)."""

    choice: dict[str, str]
    total_kl: float
    average_bpw: float
    total_bits: float
    budget: float
    exact: bool

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "average_bpw": self.average_bpw,
            "total_bits": self.total_bits,
            "total_kl": self.total_kl,
            "exact": self.exact,
            "choice": dict(self.choice),
        }


def _integer_costs(units: Sequence[BudgetUnit]) -> tuple[list[list[int]], int]:
    """Every ``params * bpw`` as an integer on one common scale, and that scale (``D``)."""
    denom = 1
    for u in units:
        for bpw, _ in u.options.values():
            denom = math.lcm(denom, Fraction(bpw).limit_denominator(1 << 12).denominator)
    costs = [
        [round(u.params * Fraction(bpw).limit_denominator(1 << 12) * denom) for bpw, _ in
         u.options.values()]
        for u in units
    ]  # fmt: skip
    return costs, denom


def solve_bits_budget(
    units: Sequence[BudgetUnit], budget: float, *, max_states: int = 100_000
) -> BudgetPlan:
    """Minimise the summed KL of one scheme per unit subject to
    ``sum(params * bpw) <= budget * sum(params)`` (see the module docstring's additivity
    assumption). Exact dynamic programming over the integer costs above each unit's cheapest
    scheme (costs divided by their gcd); when that needs more than ``max_states`` budget
    steps, costs are rounded *up* to a coarser step (the plan fits, ``exact`` is False)."""
    if not units:
        raise ConfigError("no units to plan a bit budget for")
    if not math.isfinite(budget) or budget <= 0:
        raise ConfigError(f"--bits-budget must be a positive number (got {budget})")
    for u in units:
        if not u.options or u.params <= 0:
            raise ConfigError(f"unit {u.name}: needs params > 0 and at least one scheme")
    total_params = sum(u.params for u in units)
    costs, denom = _integer_costs(units)
    base = [min(c) for c in costs]
    extra = [[c - b for c in cs] for cs, b in zip(costs, base, strict=True)]
    cap_exact = Fraction(budget).limit_denominator(1 << 20) * total_params * denom - sum(base)
    if cap_exact < 0:
        cheapest = sum(u.params * min(b for b, _ in u.options.values()) for u in units)
        raise ConfigError(
            f"--bits-budget {budget} is below the cheapest plan ({cheapest / total_params:.4f} "
            "bits per weight)"
        )
    cap = math.floor(cap_exact)
    step = math.gcd(*(c for cs in extra for c in cs)) or 1  # every sum is a multiple
    exact = True
    if cap // step > max_states:
        step, exact = math.ceil(cap / max_states), False
    cap_steps = cap // step
    kls = [[kl for _, kl in u.options.values()] for u in units]
    steps = [[-(-c // step) for c in cs] for cs in extra]  # ceil: never over the budget
    choice = _knapsack(steps, kls, cap_steps)
    names = {u.name: list(u.options) for u in units}
    plan = {u.name: names[u.name][k] for u, k in zip(units, choice, strict=True)}
    bits = sum(u.params * u.options[plan[u.name]][0] for u in units)
    kl = sum(u.options[plan[u.name]][1] for u in units)
    return BudgetPlan(plan, kl, bits / total_params, bits, budget, exact)


def _knapsack(steps: list[list[int]], kls: list[list[float]], cap: int) -> list[int]:
    """Multiple-choice knapsack by DP: ``dp[b]`` = least summed KL at exactly ``b`` extra cost
    steps; returns the chosen option index per unit."""
    inf = math.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    picks = np.zeros((len(steps), cap + 1), dtype=np.int16)
    for i, (cs, ks) in enumerate(zip(steps, kls, strict=True)):
        new = np.full(cap + 1, inf)
        for k, (c, kl) in enumerate(zip(cs, ks, strict=True)):
            if c > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[c:] = dp[: cap + 1 - c] + kl
            better = cand < new
            new[better] = cand[better]
            picks[i][better] = k
        dp = new
    b = int(np.argmin(dp))  # least KL; ties: the cheapest
    out = []
    for i in range(len(steps) - 1, -1, -1):
        k = int(picks[i][b])
        out.append(k)
        b -= steps[i][k]
    return out[::-1]
