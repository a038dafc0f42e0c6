"""Recipe gates on lm-eval scores: `min_score` and `max_score_drop` (against a reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.errors import ConfigError
from weightsmith.pipeline.gates import check_gates, validate_gates
from weightsmith.pipeline.runner import run_recipe

from .test_eval_tasks import TASK, TASK_DIR, _require_lm_eval, offline  # noqa: F401

RESULT = {  # the shape `eval tasks` reports
    "scores": {
        "arc": {"acc": 0.495, "acc_stderr": 0.01, "acc_norm": 0.60},
        "wiki": {"word_perplexity": 21.0},
    },
    "primary": {"arc": "acc", "wiki": "word_perplexity"},
    "higher_is_better": {
        "arc": {"acc": True, "acc_norm": True},
        "wiki": {"word_perplexity": False},
    },
    "reference_scores": {"arc": {"acc": 0.50, "acc_norm": 0.50}, "wiki": {"word_perplexity": 20.0}},
}


def test_score_gates_hand_computed() -> None:
    gate = {
        "min_score": {"arc": 0.5, "arc:acc_norm": 0.6},
        "max_score_drop": {"arc": "1%", "arc:acc_norm": 0.0, "wiki": "4%"},
    }
    got = [(g.name, g.passed, g.value) for g in check_gates(gate, RESULT)]
    assert [(n, p) for n, p, _ in got] == [
        ("min_score", False),  # 0.495 < 0.5
        ("min_score", True),  # 0.60 == 0.6: at the limit passes
        ("max_score_drop", True),  # (0.50 - 0.495) / 0.50 = 1% exactly
        ("max_score_drop", True),  # a gain: -20%
        ("max_score_drop", False),  # lower is better: (21 - 20) / 20 = 5% worse > 4%
    ]
    assert [v for *_, v in got] == pytest.approx([0.495, 0.60, 0.01, -0.2, 0.05])
    msgs = [g.message for g in check_gates(gate, RESULT)]
    assert msgs[0] == "arc acc 0.4950 vs min 0.5"
    assert (
        msgs[4] == "wiki word_perplexity 21.0000 vs reference 20.0000: drop 5.00% (max drop 4.00%)"
    )


def test_score_gates_missing_scores_fail() -> None:
    gate = {"min_score": {"nope": 0.1, "arc:f1": 0.1}, "max_score_drop": {"arc": "1%"}}
    res = check_gates(gate, {k: v for k, v in RESULT.items() if k != "reference_scores"})
    assert [g.passed for g in res] == [False, False, False]
    assert [g.message for g in res] == ["nope (no metric): no score measured",
                                        "arc f1: no score measured",
                                        "arc acc: no reference score"]  # fmt: skip


def test_score_gates_validated() -> None:
    assert validate_gates({"min_score": {"arc": 0.5}}, has_reference=False) == []
    problems = validate_gates({"min_score": 0.5, "max_score_drop": {"arc": "x%"}}, False)
    assert problems[0] == "gate max_score_drop needs 'reference' on the eval step"
    assert problems[1].startswith("gate min_score: a mapping of lm-eval task")
    assert problems[2].startswith("gate max_score_drop[arc]: cannot read 'x%'")


def test_recipe_gate_fails_with_one_line_naming_task(tiny_model, tmp_path: Path) -> None:
    _require_lm_eval()
    base = tiny_model("llama", seed=3)
    steps = [
        {"id": "w4", "quantize": {"method": "rtn", "bits": 4, "group_size": 32},
         "input": str(base)},
        {"id": "quality", "eval": {
            "metric": "tasks", "tasks": [TASK], "include_path": str(TASK_DIR), "limit": 4,
            "device": "cpu", "reference": str(base),
            "gate": {"max_score_drop": {TASK: "1%"}, "min_score": {TASK: 1.01}}}},
    ]  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"steps": steps}, sort_keys=False))
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "work"),
                                   "--no-progress", "--report", str(tmp_path / "r.json")])  # fmt: skip
    assert res.exit_code == 1, res.output
    step = json.loads((tmp_path / "r.json").read_text())["steps"][1]
    acc = step["result"]["scores"][TASK]["acc"]
    ref = step["result"]["reference_scores"][TASK]["acc"]
    assert step["result"]["samples"] == {TASK: 4} and acc in (0, 0.25, 0.5, 0.75, 1)
    drop = (ref - acc) / ref if ref else 0.0
    failed = [f"min_score: {TASK} acc {acc:.4f} vs min 1.01"]
    if drop > 0.01:
        failed.insert(0, f"max_score_drop: {TASK} acc {acc:.4f} vs reference {ref:.4f}: drop "
                         f"{100 * drop:.2f}% (max drop 1.00%)")  # fmt: skip
    last = res.output.strip().splitlines()[-1]
    assert last == "error: gate failed at step 'quality': " + "; ".join(failed)


def test_recipe_score_gate_needs_reference(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"steps": [{"eval": {
        "metric": "tasks", "tasks": TASK, "gate": {"max_score_drop": {TASK: "1%"}}},
        "input": str(tmp_path)}]}))  # fmt: skip
    with pytest.raises(ConfigError, match="gate max_score_drop needs 'reference'"):
        run_recipe(recipe, tmp_path / "work")
