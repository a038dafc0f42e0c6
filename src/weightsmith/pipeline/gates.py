"""Quality gates on eval steps: thresholds that fail the pipeline when quality drops."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from weightsmith.errors import ConfigError
from weightsmith.io.sizes import format_size, parse_size


@dataclass(frozen=True)
class GateResult:
    name: str
    limit: Any
    value: float | None
    passed: bool
    message: str


def parse_fraction(value: Any, name: str) -> float:
    """``0.05`` or ``"5%"`` -> 0.05."""
    try:
        if isinstance(value, str) and value.strip().endswith("%"):
            return float(value.strip()[:-1]) / 100
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"gate {name}: cannot read {value!r} (e.g. 0.05 or 5%)") from None


EPS = 1e-9  # a metric exactly at its limit passes, despite float rounding

KNOWN_GATES = ("max_ppl", "max_ppl_increase", "max_kl", "min_top1", "min_accuracy", "max_size",
               "min_score", "max_score_drop")  # fmt: skip
SCORE_GATES = ("min_score", "max_score_drop")  # {task or "task:metric": limit}, eval tasks steps


def validate_gates(gate: dict, has_reference: bool) -> list[str]:
    """Problems with a gate mapping, found before any work runs."""
    problems = [f"unknown gate {k!r} (choose from {', '.join(KNOWN_GATES)})"
                for k in gate if k not in KNOWN_GATES]  # fmt: skip
    for k in ("max_ppl_increase", "max_kl", "min_top1", "max_score_drop"):
        if k in gate and not has_reference:
            problems.append(f"gate {k} needs 'reference' on the eval step")
    for k, v in gate.items():
        if k in SCORE_GATES:
            problems += _score_gate_problems(k, v)
        elif k == "max_size":
            try:
                parse_size(v)
            except ConfigError as e:
                problems.append(str(e))
        elif k in KNOWN_GATES:
            try:
                parse_fraction(v, k)
            except ConfigError as e:
                problems.append(str(e))
    return problems


def check_gates(gate: dict, metrics: dict, model_size: int | None = None) -> list[GateResult]:
    """Evaluate each gate against an eval step's metrics (``ppl``, ``reference_ppl``, ``kl``,
    ``top1_agreement``, ``accuracy``) and the evaluated model's size on disk."""
    out = []
    for name, limit in gate.items():
        if name in SCORE_GATES:
            out += [_score_gate(name, key, lim, metrics) for key, lim in limit.items()]
            continue
        if name == "max_size":
            cap = parse_size(limit)
            ok = model_size is not None and model_size <= cap
            value = model_size
            msg = f"size {format_size(model_size or 0)} vs max {format_size(cap)}"
        elif name == "max_ppl":
            value, cap = metrics.get("ppl"), parse_fraction(limit, name)
            ok = value is not None and value <= cap + EPS
            msg = f"ppl {value:.4f} vs max {cap}" if value is not None else "no ppl measured"
        elif name == "max_ppl_increase":
            frac = parse_fraction(limit, name)
            ppl, ref = metrics.get("ppl"), metrics.get("reference_ppl")
            value = None if ppl is None or not ref else ppl / ref - 1
            ok = value is not None and value <= frac + EPS
            msg = (f"ppl {ppl:.4f} is {100 * value:+.2f}% vs reference {ref:.4f} "
                   f"(max +{100 * frac:.2f}%)") if value is not None else "no reference ppl"  # fmt: skip
        elif name in ("max_kl", "min_top1", "min_accuracy"):
            key = {"max_kl": "kl", "min_top1": "top1_agreement", "min_accuracy": "accuracy"}[name]
            value, bound = metrics.get(key), parse_fraction(limit, name)
            ok = value is not None and (
                value <= bound + EPS if name.startswith("max") else value >= bound - EPS
            )
            rel = "max" if name.startswith("max") else "min"
            msg = f"{key} {value:.5g} vs {rel} {bound}" if value is not None else f"no {key}"
        else:
            raise ConfigError(f"unknown gate {name!r}")
        out.append(GateResult(name, limit, value, bool(ok), msg))
    return out


def _score_gate_problems(name: str, value: Any) -> list[str]:
    if not isinstance(value, dict) or not value:
        return [f"gate {name}: a mapping of lm-eval task (or task:metric) to limit, "
                f"e.g. {{{name}: {{arc_easy: {'1%' if name == 'max_score_drop' else 0.5}}}}}"]  # fmt: skip
    problems = []
    for key, limit in value.items():
        try:
            parse_fraction(limit, f"{name}[{key}]")
        except ConfigError as e:
            problems.append(str(e))
    return problems


def _score_gate(name: str, key: str, limit: Any, metrics: dict) -> GateResult:
    """One task's score gate on an ``eval tasks`` result: ``key`` is ``task`` (its primary
    metric) or ``task:metric``; ``max_score_drop`` is relative to the reference's score."""
    task, _, metric = str(key).partition(":")
    metric = metric or (metrics.get("primary") or {}).get(task, "")
    score = ((metrics.get("scores") or {}).get(task) or {}).get(metric)
    bound = parse_fraction(limit, f"{name}[{key}]")
    label = f"{task} {metric or '(no metric)'}"
    if score is None:
        return GateResult(name, limit, None, False, f"{label}: no score measured")
    if name == "min_score":
        msg = f"{label} {score:.4f} vs min {bound}"
        return GateResult(name, limit, score, score >= bound - EPS, msg)
    ref = ((metrics.get("reference_scores") or {}).get(task) or {}).get(metric)
    if ref is None:
        return GateResult(name, limit, None, False, f"{label}: no reference score")
    higher = ((metrics.get("higher_is_better") or {}).get(task) or {}).get(
        metric.split(",")[0], True
    )
    worse = ref - score if higher is not False else score - ref
    drop = worse / abs(ref) if ref else (0.0 if worse <= 0 else math.inf)
    msg = (f"{label} {score:.4f} vs reference {ref:.4f}: "
           f"{'drop' if drop >= 0 else 'gain'} {100 * abs(drop):.2f}% (max drop {100 * bound:.2f}%)")  # fmt: skip
    value = drop if math.isfinite(drop) else None  # reports never hold Inf
    return GateResult(name, limit, value, drop <= bound + EPS, msg)
