"""End to end: `eval sensitivity` and `compress quantize --bits-budget` on a tiny seeded Llama
(weights x20 so that quantization moves its distributions measurably), and their bad input:
exit 1 with one line, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.compress.bits_budget import solve_bits_budget
from weightsmith.compress.sensitivity import budget_units
from weightsmith.core.models import load_causal_lm

FAST = ["--sensitivity-samples", "2", "--sensitivity-seq-len", "32"]
SCHEMES = "w3g32,w4g64,w8g64"


@pytest.fixture(scope="module")
def peaked(tmp_path_factory) -> Path:
    from weightsmith.testing import build_tiny_model

    src = build_tiny_model(tmp_path_factory.mktemp("sens") / "src", "llama", seed=0)
    model = load_causal_lm(src)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)
    out = src.parent / "peaked"
    model.save_pretrained(out, safe_serialization=True)
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def invoke(*args: str):
    return CliRunner().invoke(cli, [*args, "--no-progress"])


def test_eval_sensitivity_report(peaked: Path, tmp_path: Path):
    rep = tmp_path / "sens.json"
    r = invoke("eval", "sensitivity", str(peaked), "--schemes", SCHEMES, "--samples", "2",
               "--seq-len", "32", "--report", str(rep))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "model.layers.1.mlp.down_proj" in r.output and "w3g32" in r.output
    d = json.loads(rep.read_text())["result"]
    assert len(d["units"]) == 14 and d["tokens"] == 64
    for u in d["units"]:
        assert set(u["schemes"]) == {"w3g32", "w4g64", "w8g64"}
        assert all(v["kl"] >= 0 for v in u["schemes"].values())
        assert u["schemes"]["w4g64"]["bits_per_weight"] == 4.25
        assert u["schemes"]["w4g64"]["size_bytes"] == u["params"] * 4.25 / 8
    r = invoke("eval", "sensitivity", str(peaked), "--by", "type", "--schemes", "w4g64",
               "--samples", "1", "--seq-len", "16", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [u["name"] for u in json.loads(r.stdout)["units"]][-1] == "mlp.down_proj"
    assert json.loads(r.stdout)["device"] == "cpu"  # --device auto, no CUDA here
    assert "note: no --calib given" in r.stderr  # the built-in mix, said on stderr only


def test_quantize_bits_budget(peaked: Path, tmp_path: Path):
    out, rep = tmp_path / "q", tmp_path / "q.json"
    r = invoke("compress", "quantize", str(peaked), "-o", str(out), "--bits-budget", "4.25",
               "--budget-schemes", SCHEMES, *FAST, "--report", str(rep))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "bits budget 4.25: plan" in r.output
    report = json.loads(rep.read_text())
    plan = report["bits_budget"]
    assert plan["average_bpw"] <= 4.25 + 1e-12
    assert plan["choice"] == solve_bits_budget(budget_units(plan["sensitivity"]), 4.25).choice
    # uniform w4g64 fits the budget too, so the optimum's summed KL is at most its own
    uniform = sum(u["schemes"]["w4g64"]["kl"] for u in plan["sensitivity"]["units"])
    assert plan["total_kl"] <= uniform + 1e-12
    assert len(set(plan["choice"].values())) > 1  # a real mix on this model
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    stored = {
        m: f"w{g['weights']['num_bits']}g{g['weights']['group_size']}"
        for g in groups.values()
        for m in g["targets"]
    }
    assert stored == plan["choice"]
    # the same plan from a saved `eval sensitivity` report, without measuring again
    sens = tmp_path / "sens.json"
    sens.write_text(json.dumps(plan["sensitivity"]))
    r = invoke("compress", "quantize", str(peaked), "-o", str(tmp_path / "q2"), "--bits-budget",
               "4.25", "--sensitivity", str(sens), "--report", str(tmp_path / "q2.json"))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q2.json").read_text())["bits_budget"]["choice"] == plan["choice"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits-budget", "2.5"], "outside what the candidate schemes can give: 3.5"),
        (["--bits-budget", "9"], "to 8.25 (all dearest)"),
        (["--bits-budget", "nan"], "finite"),
        (["--bits-budget", "-1"], "positive"),
        (["--bits-budget", "4", "--budget-schemes", "w4q9"], "bad scheme 'w4q9'"),
        (["--bits-budget", "4", "--budget-schemes", "w4g48"], "no scheme of w4g48 fits"),
        (["--bits-budget", "4", "--scheme-map", "down_proj=w8g64"], "do not give --scheme-map"),
        (["--bits-budget", "4", "--method", "nf4"], "--bits-budget applies to the integer-grid"),
        (["--sensitivity-samples", "3"], "applies to --bits-budget only"),
    ],
)
def test_bad_input(peaked: Path, tmp_path: Path, args: list[str], message: str):
    out = tmp_path / "q"
    default = [] if "--budget-schemes" in args else ["--budget-schemes", SCHEMES]
    r = invoke("compress", "quantize", str(peaked), "-o", str(out), *args, *FAST, *default)
    assert r.exit_code == 1, r.output
    assert message in r.output
    assert not out.exists()


def test_eval_bad_input(peaked: Path, tmp_path: Path):
    rep = tmp_path / "r.json"
    r = invoke("eval", "sensitivity", str(peaked), "--schemes", "w4g64,w4g64")
    assert r.exit_code == 1 and "twice" in r.output
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    r = invoke("eval", "sensitivity", str(peaked), "--calib", str(short), "--report", str(rep))
    assert r.exit_code == 1 and "fewer than the 512 that --samples 4 x --seq-len 128" in r.output
    assert str(short) in r.output
