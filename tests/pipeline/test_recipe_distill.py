"""`distill:` recipe steps: ``method:`` picks the `distill` subcommand (kd when absent), options
of another method are reported before any work, and a dSFT step runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from weightsmith.errors import ConfigError
from weightsmith.io import open_checkpoint
from weightsmith.pipeline import load_recipe, run_recipe
from weightsmith.pipeline.runner import plan_recipe


@pytest.fixture
def models(models: Path) -> Path:
    """The shared models folder plus prompt/completion pairs for dSFT."""
    root = models
    rows = [{"prompt": "Q: who went to the park?", "completion": " Lily and Tom went."}] * 4
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _write(tmp_path: Path, steps: list[dict]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"steps": steps}, sort_keys=False))
    return path


def test_method_picks_the_subcommand(tmp_path: Path, models: Path) -> None:
    recipe = _write(tmp_path, [
        {"id": "kd", "input": "models/b",
         "distill": {"teacher": "models/a", "data": "models/text.txt", "loss": "jsd", "beta": 0.3}},
        {"id": "sft", "distill": {"method": "sft", "data": "models/pairs.jsonl", "steps": 2}},
        {"id": "sbs", "distill": {"method": "step-by-step", "data": "models/pairs.jsonl",
                                  "label_weight": 0.3}},
    ])  # fmt: skip
    work = tmp_path / "work"
    kd, sft, sbs = (p.command for p in plan_recipe(load_recipe(recipe), work, progress=False))
    assert kd == ["distill", "kd", "--teacher", str(models / "a"), "--data",
                  str(models / "text.txt"), "--loss", "jsd", "--beta", "0.3", "--student",
                  str(models / "b"), "-o", str(work / "kd"), "--no-progress"]  # fmt: skip
    assert sft == ["distill", "sft", "--data", str(models / "pairs.jsonl"), "--steps", "2",
                   "--student", str(work / "kd"), "-o", str(work / "sft"),
                   "--no-progress"]  # fmt: skip
    assert sbs[:2] == ["distill", "step-by-step"] and "--label-weight" in sbs


def test_options_of_another_method_reported_before_any_work(tmp_path: Path, models: Path):
    recipe = _write(tmp_path, [
        {"id": "s1", "input": "models/a",
         "distill": {"method": "sft", "data": "models/pairs.jsonl", "teacher": "models/b",
                     "beta": 0.1}},
        {"id": "s2", "distill": {"method": "dpo", "data": "models/pairs.jsonl", "alpha": 0.5}},
        {"id": "s3", "distill": {"method": "step-by-step", "data": "models/pairs.jsonl",
                                 "alpha": 0.5}},
        {"id": "s4", "distill": {"teacher": "models/a", "data": "models/text.txt",
                                 "label_smoothing": 0.1}},
        {"id": "s5", "distill": {"method": "distil-bert", "data": "models/text.txt"}},
    ])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        run_recipe(recipe, tmp_path / "work")
    msg = str(err.value)
    for expected in [
        "step 's1' (distill): unknown option 'teacher'",
        "step 's1' (distill): unknown option 'beta'",
        "step 's2' (distill): unknown option 'alpha'",
        "step 's3' (distill): unknown option 'alpha'",
        "step 's4' (distill): unknown option 'label_smoothing'",
        "step 's5' (distill): `weightsmith distill distil-bert` does not exist",
    ]:
        assert expected in msg, expected
    assert not (tmp_path / "work").exists()


def test_sft_step_runs(tmp_path: Path, models: Path) -> None:
    recipe = _write(tmp_path, [
        {"id": "dsft", "input": "models/a",
         "distill": {"method": "sft", "data": "models/pairs.jsonl", "steps": 2, "batch_size": 2,
                     "seq_len": 16, "lr": 1e-2}},
        {"eval": {"data": "models/text.txt", "seq_len": 16, "max_tokens": 64}},
    ])  # fmt: skip
    work = tmp_path / "work"
    report = run_recipe(recipe, work, progress=False, echo=lambda m: None)
    assert report["ok"] and [s["kind"] for s in report["steps"]] == ["distill", "eval"]
    assert report["steps"][0]["command"].startswith("weightsmith distill sft --data")
    assert report["steps"][0]["result"]["steps"] == 2
    prov = json.loads((work / "dsft" / "weightsmith.json").read_text())
    assert prov["config"]["method"] == "sft" and prov["config"]["loss"]["alpha"] == 1.0
    with open_checkpoint(work / "dsft") as out, open_checkpoint(models / "a") as base:
        assert set(out.tensors) == set(base.tensors)
        assert any(not out.get_tensor(n).equal(base.get_tensor(n)) for n in out.tensors)
    assert report["steps"][1]["result"]["ppl"] > 1
