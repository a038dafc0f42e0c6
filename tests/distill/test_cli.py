"""The `distill` command line: a happy path with --report, every error case (one line,
exit 1, nothing left behind), and the multi-process run (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from weightsmith.cli.main import distill_cli
from weightsmith.io import open_checkpoint

FAST = ["--steps", "2", "--seq-len", "32", "--batch-size", "4", "--no-progress"]


def _run(args: list[str]):
    return CliRunner().invoke(distill_cli, [str(a) for a in args])


def test_cli_trains_and_reports(teacher, student, corpus, tmp_path):
    out, report = tmp_path / "out", tmp_path / "r.json"
    r = _run(["--teacher", teacher, "--student", student, "--data", corpus, "-o", out,
              "--loss", "jsd", "--beta", "0.3", "--report", report, *FAST])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "distilled 2 steps" in r.output
    body = json.loads(report.read_text())
    assert body["ok"] and body["result"]["steps"] == 2 and len(body["result"]["losses"]) == 2
    prov = json.loads((out / "weightsmith.json").read_text())
    assert prov["config"]["loss"] == {"loss": "jsd", "beta": 0.3, "temperature": 2.0,
                                      "alpha": 0.5, "version": 1}  # fmt: skip


def test_cli_cache_then_train(teacher, student, corpus, tmp_path):
    cache = tmp_path / "cache"
    r = _run(["cache", "--teacher", teacher, "--data", corpus, "-o", cache, "--top-k", "4",
              "--seq-len", "32", "--no-progress", "--report", tmp_path / "c.json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c.json").read_text())["result"]["meta"]["top_k"] == 4
    r = _run(["--teacher-cache", cache, "--student", student, "--data", corpus,
              "-o", tmp_path / "o", *FAST])  # fmt: skip
    assert r.exit_code == 0, r.output


def _fails(r, match: str, *absent: Path) -> None:
    assert r.exit_code == 1, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], r.output
    for p in absent:
        assert not p.exists()


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--data", "{tmp}/missing.txt"], "data file not found"),
        (["--data", "{tmp}/d.csv"], "must be .txt or .jsonl"),
        (["--data", "{tmp}/bad.jsonl"], "bad.jsonl:2: invalid JSON"),
        (["--save-adapter"], "--save-adapter needs a LoRA student"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--lora-r", "4", "--lora-targets", "nonexistent_proj"], "--lora-targets"),
        (["--teacher-cache", "{tmp}/fake"], "not a teacher cache"),
    ],
)
def test_cli_errors(teacher, student, corpus, tmp_path, extra, match):
    (tmp_path / "d.csv").write_text("a,b\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (tmp_path / "fake").mkdir()
    args = ["--teacher", teacher, "--student", student, "--data", corpus, "-o", tmp_path / "o",
            "--seq-len", "32", "--batch-size", "4", "--steps", "1", "--no-progress"]  # fmt: skip
    args += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    _fails(_run(args), match, tmp_path / "o")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]  # no temp dirs


def test_cli_different_tokenizers_suggest_seqkd(teacher, other_tokenizer_student, corpus,
                                                tmp_path):  # fmt: skip
    r = _run(["--teacher", teacher, "--student", other_tokenizer_student, "--data", corpus,
              "-o", tmp_path / "o", *FAST])  # fmt: skip
    _fails(r, "use --method seqkd", tmp_path / "o")


def test_cli_refuses_existing_output_before_training(teacher, student, corpus, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _run(["--teacher", teacher, "--student", student, "--data", corpus, "-o", out, *FAST])
    _fails(r, "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_missing_teacher_and_student(student, corpus, tmp_path):
    r = _run(["--student", student, "--data", corpus, "-o", tmp_path / "o", *FAST])
    _fails(r, "give --teacher or --teacher-cache", tmp_path / "o")
    r = _run(["--data", corpus, "-o", tmp_path / "o", *FAST])
    assert r.exit_code == 1 and "missing --student" in r.output


def test_cli_cache_errors(teacher, corpus, tmp_path):
    r = _run(["cache", "--teacher", teacher, "--data", corpus, "-o", tmp_path / "c",
              "--top-k", "100000", "--seq-len", "32", "--no-progress"])  # fmt: skip
    _fails(r, "exceeds the teacher's", tmp_path / "c")
    r = _run(["cache", "--teacher", tmp_path / "nope", "--data", corpus, "-o", tmp_path / "c"])
    _fails(r, "nope", tmp_path / "c")


@pytest.mark.slow
def test_two_processes_match_one(teacher, student, corpus, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) == one process."""
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate launcher not on PATH")
    common = ["--teacher", teacher, "--student", student, "--data", corpus, "--steps", "3",
              "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2",
              "--lora-r", "4", "--lora-dropout", "0", "--no-progress"]  # fmt: skip
    single = _run([*common, "-o", tmp_path / "one", "--report", tmp_path / "one.json"])
    assert single.exit_code == 0, single.output
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "weightsmith.distill",
           *map(str, common), "-o", str(tmp_path / "two"),
           "--report", str(tmp_path / "two.json")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())["result"]
    two = json.loads((tmp_path / "two.json").read_text())["result"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    with open_checkpoint(tmp_path / "one") as a, open_checkpoint(tmp_path / "two") as b:
        for name in a.tensors:
            torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), atol=1e-5, rtol=1e-4)
    assert sys.executable  # the launcher runs the same interpreter's package
