"""Recipes: validation before work, gates against hand-computed values, resume, shipped examples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.errors import ConfigError
from weightsmith.pipeline import check_gates, load_recipe
from weightsmith.pipeline.gates import parse_fraction
from weightsmith.pipeline.runner import plan_recipe, run_recipe
from weightsmith.testing import build_tiny_model
from weightsmith.testing.tiny import TOKENIZER_CORPUS

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "ci").glob("*.yaml"))


def test_gates_hand_computed() -> None:
    metrics = {"ppl": 10.5, "reference_ppl": 10.0, "kl": 0.02, "top1_agreement": 0.93}
    gates = {
        "max_ppl_increase": "5%",
        "max_kl": 0.01,
        "min_top1": 0.9,
        "max_ppl": 10,
        "max_size": "1KB",
    }
    result = {g.name: g for g in check_gates(gates, metrics, model_size=1000)}
    assert result["max_ppl_increase"].passed  # 10.5 / 10 - 1 = 0.05 exactly at the limit
    assert result["max_ppl_increase"].value == pytest.approx(0.05)
    assert not result["max_kl"].passed and result["min_top1"].passed
    assert not result["max_ppl"].passed and result["max_size"].passed
    assert not check_gates({"max_size": "999B"}, {}, model_size=1000)[0].passed
    assert parse_fraction("5%", "x") == pytest.approx(0.05) and parse_fraction(0.1, "x") == 0.1


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_every_problem_reported_before_any_work(tmp_path: Path, models: Path) -> None:
    recipe = _write(tmp_path, {"steps": [
        {"id": "m", "merge": {"method": "slerp", "args": ["models/a", "models/nope"], "t": 0.5}},
        {"quantize": {"method": "rtn", "bitz": 4}},
        {"quantize": {"method": "rtn", "bits": "four"}},
        {"eval": {"data": "models/text.txt", "gate": {"max_kl": 0.1, "max_speed": 3}}},
        {"teleport": {}},
    ]})  # fmt: skip
    with pytest.raises(ConfigError) as err:
        run_recipe(recipe, tmp_path / "work")
    msg = str(err.value)
    assert "unknown step 'teleport'" in msg  # structure problems first, all listed
    del_last = yaml.safe_load(recipe.read_text())
    del_last["steps"].pop()
    recipe.write_text(yaml.safe_dump(del_last))
    with pytest.raises(ConfigError) as err:
        run_recipe(recipe, tmp_path / "work")
    msg = str(err.value)
    for expected in ["'models/nope' is neither a step id nor a path", "unknown option 'bitz'",
                     "'four'", "unknown gate 'max_speed'", "max_kl needs 'reference'"]:  # fmt: skip
        assert expected in msg, expected
    assert not (tmp_path / "work").exists()


def test_dry_run_builds_the_command_lines(tmp_path: Path, models: Path) -> None:
    recipe = _write(tmp_path, {"steps": [
        {"id": "merged", "merge": {"method": "ties", "args": ["models/b"], "base": "models/a",
                                   "density": 0.5}},
        {"id": "small", "quantize": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False,
                                     "ignore": ["lm_head"]}},
        {"eval": {"data": "models/text.txt", "reference": "merged"}, "input": "small"},
    ]})  # fmt: skip
    planned = plan_recipe(load_recipe(recipe), tmp_path / "work")
    work = tmp_path / "work"
    assert planned[0].command == ["merge", "ties", str(models / "b"), "--base", str(models / "a"),
                                  "--density", "0.5", "-o", str(work / "merged")]  # fmt: skip
    assert planned[1].command == [
        "compress", "quantize", str(work / "merged"), "--method", "rtn", "--bits", "4",
        "--group-size", "32", "--asym", "--ignore", "lm_head", "-o", str(work / "small"),
    ]  # fmt: skip
    assert planned[2].command[:3] == ["eval", "ppl", str(work / "small")]
    assert "--reference" in planned[2].command and planned[2].depends == ["small", "merged"]


@pytest.mark.slow
def test_run_resume_and_failing_gate(tmp_path: Path, models: Path) -> None:
    steps = [
        {"id": "bf16", "convert": {"dtype": "bfloat16"}, "input": "models/a"},
        {"id": "small", "quantize": {"method": "rtn", "bits": 8, "group_size": 32}},
        {"eval": {"data": "models/text.txt", "seq_len": 32, "max_tokens": 300,
                  "reference": "bf16", "gate": {"max_ppl_increase": "50%"}}},
    ]  # fmt: skip
    recipe = _write(tmp_path, {"steps": steps})
    work, report = tmp_path / "work", tmp_path / "report.json"
    runner = CliRunner()
    result = runner.invoke(cli, ["run", str(recipe), "-o", str(work), "--no-progress",
                                 "--report", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["ok"] and [s["skipped"] for s in data["steps"]] == [False, False, False]
    eval_step = data["steps"][2]
    assert eval_step["gates"][0]["passed"] and eval_step["result"]["ppl"] > 1
    assert (work / "small" / "config.json").exists() and (work / "summary.md").exists()

    result = runner.invoke(cli, ["run", str(recipe), "-o", str(work), "--resume",
                                 "--report", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [s["skipped"] for s in json.loads(report.read_text())["steps"]] == [True, True, True]

    result = runner.invoke(cli, ["run", str(recipe), "-o", str(work)])
    assert result.exit_code == 1 and "already exist" in result.output

    steps[2]["eval"]["gate"] = {"max_ppl_increase": -0.5}  # impossible: must halve ppl
    recipe.write_text(yaml.safe_dump({"steps": steps}))
    result = runner.invoke(cli, ["run", str(recipe), "-o", str(work), "--resume", "--no-progress",
                                 "--report", str(report)])  # fmt: skip
    assert result.exit_code == 1
    assert "gate failed at step 'eval': max_ppl_increase" in result.output
    data = json.loads(report.read_text())
    assert data["ok"] is False and [s["skipped"] for s in data["steps"]] == [True, True, False]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_shipped_recipes_validate(example: Path, tmp_path: Path, tiny_model) -> None:
    shutil.copy(example, tmp_path / example.name)
    root = tmp_path / "models"
    root.mkdir()
    for sub, seed in (("a", 0), ("b", 1)):
        shutil.copytree(tiny_model("llama", seed), root / sub)
    (root / "text.txt").write_text(" ".join(TOKENIZER_CORPUS))
    report = run_recipe(tmp_path / example.name, tmp_path / "work", dry_run=True)
    assert report["ok"] and report["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_shipped_recipes_run(example: Path, tmp_path: Path) -> None:
    shutil.copy(example, tmp_path / example.name)
    build_tiny_model(tmp_path / "models" / "a", seed=0)
    build_tiny_model(tmp_path / "models" / "b", seed=1)
    (tmp_path / "models" / "text.txt").write_text(" ".join(TOKENIZER_CORPUS))
    report = run_recipe(tmp_path / example.name, tmp_path / "work", progress=False)
    assert report["ok"]


def test_qat_and_bitnet_steps_run(tmp_path: Path, models: Path) -> None:
    """The `qat` and `bitnet` step kinds run their commands and feed the next step."""
    steps = [
        {"id": "qat4", "input": "models/a",
         "qat": {"data": "models/text.txt", "bits": 4, "group_size": 32, "steps": 2,
                 "batch_size": 2, "seq_len": 16, "lr": 1e-3}},
        {"id": "ternary", "input": "models/a",
         "bitnet": {"data": "models/text.txt", "steps": 2, "batch_size": 2, "seq_len": 16,
                    "lambda_warmup": 1}},
        {"eval": {"data": "models/text.txt", "seq_len": 16, "max_tokens": 64,
                  "reference": "models/a"}, "input": "qat4"},
    ]  # fmt: skip
    recipe = _write(tmp_path, {"steps": steps})
    work, report = tmp_path / "work", tmp_path / "report.json"
    result = CliRunner().invoke(
        cli, ["run", str(recipe), "-o", str(work), "--no-progress", "--report", str(report)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["ok"] and len(data["steps"]) == 3
    qcfg = json.loads((work / "qat4" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    bcfg = json.loads((work / "ternary" / "config.json").read_text())["quantization_config"]
    assert bcfg["quant_method"] == "bitnet"
    assert data["steps"][2]["result"]["ppl"] > 1
