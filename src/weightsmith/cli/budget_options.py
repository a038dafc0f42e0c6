"""``compress quantize --bits-budget B``: the options, their checks, and the plan's printout
(the quantizer then runs with the plan as its ``--scheme-map``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from weightsmith.cli.common import FINITE_FLOAT
from weightsmith.errors import ConfigError

BUDGET_KEYS = ("bits_budget", "budget_schemes", "sensitivity", "sensitivity_samples",
               "sensitivity_seq_len")  # fmt: skip


def bits_budget_options(fn: Callable) -> Callable:
    opts = [
        click.option(
            "--bits-budget", type=FINITE_FLOAT, default=None, metavar="B",
            help="Mixed precision by measurement: per-Linear schemes (from --budget-schemes) "
            "that minimise the summed KL to the original (`eval sensitivity`, on --calib) "
            "under an average of B bits per weight; the plan is printed and reported.",
        ),
        click.option(
            "--budget-schemes", default="w3g64,w4g128,w4g64,w8g128", show_default=True,
            help="--bits-budget: candidate schemes (a group that does not divide a Linear's "
            "input width is not a candidate for it).",
        ),
        click.option(
            "--sensitivity", type=click.Path(dir_okay=False), default=None,
            help="--bits-budget: reuse this `eval sensitivity --report` instead of measuring.",
        ),
        click.option(
            "--sensitivity-samples", type=click.IntRange(min=1), default=4, show_default=True,
            help="--bits-budget: calibration windows of the sensitivity pass.",
        ),
        click.option(
            "--sensitivity-seq-len", type=click.IntRange(min=2), default=128,
            show_default=True, help="--bits-budget: tokens per sensitivity window.",
        ),
    ]  # fmt: skip
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def read_sensitivity_report(path: str) -> dict:
    """An ``eval sensitivity`` report (the ``--report`` file or the bare result)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--sensitivity {path}: unreadable ({type(e).__name__})") from None
    data = data.get("result", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or "units" not in data:
        raise ConfigError(f"--sensitivity {path}: not an `eval sensitivity` report")
    return data


def budget_request(options: dict, calib: str | None, given: Callable[[str], bool]):
    """Pop the budget options from ``options``; a BudgetRequest, or None without
    --bits-budget (then the other budget options must not be given)."""
    from weightsmith.compress.budget_plan import BudgetRequest
    from weightsmith.compress.sensitivity import parse_scheme_list

    vals = {k: options.pop(k) for k in BUDGET_KEYS}
    if vals["bits_budget"] is None:
        extra = [k for k in BUDGET_KEYS[1:] if given(k)]
        if extra:
            raise ConfigError(f"--{extra[0].replace('_', '-')} applies to --bits-budget only")
        return None
    if vals["bits_budget"] <= 0:
        raise ConfigError(f"--bits-budget must be positive (got {vals['bits_budget']})")
    report = read_sensitivity_report(vals["sensitivity"]) if vals["sensitivity"] else None
    return BudgetRequest(
        budget=vals["bits_budget"], schemes=tuple(parse_scheme_list(vals["budget_schemes"])),
        calib=calib, samples=vals["sensitivity_samples"], seq_len=vals["sensitivity_seq_len"],
        report=report,
    )  # fmt: skip


def run_budget(model: str, req, progress: bool):
    """Measure and solve; print the plan (one line per scheme) and return the outcome."""
    from tqdm.auto import tqdm

    from weightsmith.compress.budget_plan import plan_bits_budget

    with tqdm(desc="sensitivity", disable=not progress or req.report is not None) as bar:
        outcome = plan_bits_budget(model, req, on_unit=lambda u, k: bar.update())
    s = outcome.summary()
    per = ", ".join(f"{k} x{v}" for k, v in sorted(s["units_per_scheme"].items()))
    click.echo(
        f"bits budget {req.budget}: plan {per} over {len(outcome.plan.choice)} units, "
        f"{s['average_bpw']:.4f} bits/weight, summed KL {s['total_kl']:.5f} "
        f"(measured one unit at a time{'' if s['exact'] else '; approximate solve'})"
    )
    for name, scheme in outcome.plan.choice.items():
        click.echo(f"  {name} = {scheme}", err=True)
    return outcome
