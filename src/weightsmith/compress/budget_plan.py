"""``compress quantize --bits-budget B``: measure each Linear's sensitivity, solve for the
schemes that minimise the summed KL under an average of B bits per weight, and turn the plan
into a ``--scheme-map`` (exact module names) for the quantizer."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from weightsmith.compress.bits_budget import BudgetPlan, solve_bits_budget
from weightsmith.compress.schemes import Scheme, parse_scheme
from weightsmith.compress.sensitivity import (
    applicable_schemes,
    budget_units,
    load_on,
    measure_sensitivity,
    sensitivity_units,
)
from weightsmith.core.calibration_data import calibration_windows
from weightsmith.core.device import select_device
from weightsmith.errors import ConfigError

FLAGS = ("--sensitivity-samples", "--sensitivity-seq-len")


@dataclass(frozen=True)
class BudgetRequest:
    """What ``--bits-budget`` needs: the budget, the candidate schemes, and the calibration
    windows of the sensitivity pass (or a sensitivity report to reuse)."""

    budget: float
    schemes: tuple[Scheme, ...]
    calib: str | None = None
    samples: int = 4
    seq_len: int = 128
    by: str = "module"
    report: dict | None = None  # an `eval sensitivity` report: no measurement
    device: str = "cpu"  # where the sensitivity pass runs (``auto``: CUDA when present)


@dataclass(frozen=True)
class BudgetOutcome:
    plan: BudgetPlan
    sensitivity: dict
    scheme_map: tuple[tuple[str, Scheme], ...]  # (exact module name, scheme)

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for s in self.plan.choice.values():
            counts[s] = counts.get(s, 0) + 1
        return {**self.plan.to_dict(), "units_per_scheme": counts,
                "by": self.sensitivity.get("by", "module")}  # fmt: skip


def check_budget_range(budget: float, ranges: Sequence[tuple[int, float, float]]) -> None:
    """``ranges``: ``(params, cheapest bpw, dearest bpw)`` per unit; the budget must lie between
    the all-cheapest and the all-dearest plan."""
    total = sum(p for p, _, _ in ranges)
    lo = sum(p * a for p, a, _ in ranges) / total
    hi = sum(p * b for p, _, b in ranges) / total
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        raise ConfigError(
            f"--bits-budget {budget} is outside what the candidate schemes can give: "
            f"{lo:.4g} (all cheapest) to {hi:.4g} (all dearest) bits per weight"
        )


def plan_bits_budget(
    path: str | os.PathLike[str],
    req: BudgetRequest,
    on_unit: Callable | None = None,
) -> BudgetOutcome:
    """Measure (or read) the sensitivity of every unit of the checkpoint at ``path``, check the
    budget range *before* measuring, and solve for the plan."""
    if req.report is not None:
        report = req.report
        units = budget_units(report)
        check_budget_range(req.budget, [
            (u.params, min(b for b, _ in u.options.values()), max(b for b, _ in u.options.values()))
            for u in units
        ])  # fmt: skip
    else:
        dev = select_device(req.device)
        ids, info = calibration_windows(path, req.calib, req.samples, req.seq_len, FLAGS)
        model = load_on(path, dev)
        sunits = sensitivity_units(model, req.by)
        ranges = []
        for u in sunits:
            bpws = [u.bits_per_weight(s) for s in applicable_schemes(model, u, req.schemes)]
            ranges.append((u.params, min(bpws), max(bpws)))
        check_budget_range(req.budget, ranges)
        result = measure_sensitivity(model, ids.to(dev), req.schemes, by=req.by, on_unit=on_unit)
        result.extra = {"model": str(path), "calib": info["source"], "device": str(dev)}
        report = result.to_dict()
        units = budget_units(report)
    plan = solve_bits_budget(units, req.budget)
    modules = {u["name"]: u.get("modules", [u["name"]]) for u in report["units"]}
    scheme_map = tuple(
        (m, parse_scheme(plan.choice[name])) for name, mods in modules.items() for m in mods
    )
    return BudgetOutcome(plan, report, scheme_map)
