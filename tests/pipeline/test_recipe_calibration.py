"""Recipes calibrate like the CLI: no `calib:` -> the built-in mix; too short a `calib:` -> the
one-line error, nothing written."""

from __future__ import annotations

import json
import shutil

import yaml
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.core.calibration_data import BUILTIN_SOURCE


def _run_recipe(tiny_model, tmp_path, **calib):
    shutil.copytree(tiny_model("llama"), tmp_path / "a")
    recipe = tmp_path / "r.yaml"
    step = {"method": "gptq", "bits": 4, "group_size": 32, "calib_samples": 4, "seq_len": 32}
    recipe.write_text(yaml.safe_dump(
        {"steps": [{"id": "q", "input": "a", "quantize": {**step, **calib}}]}, sort_keys=False
    ))  # fmt: skip
    return CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "w"), "--no-progress"])


def test_recipe_without_calib_uses_the_builtin_mix(tiny_model, tmp_path, capfd):
    res = _run_recipe(tiny_model, tmp_path)
    assert res.exit_code == 0, res.output
    assert "note: no --calib given" in capfd.readouterr().err  # the step's own stderr
    prov = json.loads((tmp_path / "w" / "q" / "weightsmith.json").read_text())
    assert prov["calibration"]["source"] == BUILTIN_SOURCE
    assert prov["calibration"]["tokens"] == 4 * 32


def test_recipe_with_too_short_calib_fails_before_writing(tiny_model, tmp_path):
    (tmp_path / "short.txt").write_text("Too short to calibrate on. " * 2)
    res = _run_recipe(tiny_model, tmp_path, calib="short.txt")
    assert res.exit_code == 1, res.output
    assert "short.txt: " in res.output
    assert "fewer than the 128 that --calib-samples 4 x --seq-len 32 need" in res.output
    assert not (tmp_path / "w" / "q").exists()
