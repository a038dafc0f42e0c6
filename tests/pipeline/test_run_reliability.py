"""`weightsmith run` under bad ids, signals and tampered outputs (issue #16, sections 3-5)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import weightsmith
from weightsmith.cli.main import cli
from weightsmith.convert import convert


def _recipe(tmp_path: Path, steps: list[dict]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"steps": steps}, sort_keys=False))
    return path


def _run(recipe: Path, work: Path, *extra: str):
    return CliRunner().invoke(cli, ["run", str(recipe), "-o", str(work), "--no-progress", *extra])


# ------------------------------------------------------------------ step ids (section 3)
@pytest.mark.parametrize("bad_id", ["summary.md", "a.report", "..", "x/y", "has space", "-x"])
def test_unsafe_step_id_refused_before_any_work(bad_id: str, tmp_path: Path, models: Path) -> None:
    recipe = _recipe(tmp_path, [{"id": bad_id, "convert": {}, "input": "models/a"}])
    result = _run(recipe, tmp_path / "work")
    assert result.exit_code == 1, result.output
    assert f"id {bad_id!r} must be a plain name" in result.output
    assert result.output.strip().count("\n") == 0  # one line
    assert not (tmp_path / "work").exists()


def test_ids_differing_only_in_case_are_duplicates(tmp_path: Path, models: Path) -> None:
    steps = [{"id": "Merged", "convert": {}, "input": "models/a"}, {"id": "merged", "convert": {}}]
    result = _run(_recipe(tmp_path, steps), tmp_path / "work")
    assert result.exit_code == 1 and "duplicate id 'merged'" in result.output


def test_plots_inside_a_step_output_refused(tmp_path: Path, models: Path) -> None:
    recipe = _recipe(tmp_path, [{"id": "first", "convert": {}, "input": "models/a"}])
    work = tmp_path / "work"
    result = _run(recipe, work, "--plots", str(work / "first" / "plots"))
    assert result.exit_code == 1 and "which the run writes itself" in result.output
    assert not work.exists()


# ------------------------------------------------------------------ signals (section 4)
SLOW_COMMIT = """
import os, time
marker = os.environ.get("WEIGHTSMITH_TEST_SLOW_COMMIT")
if marker:
    import weightsmith.io.writer as writer

    commit = writer.CheckpointWriter.commit

    def slow_commit(self, *args, **kwargs):
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        time.sleep(120)  # a long write, mid-way: the temporary output exists
        return commit(self, *args, **kwargs)

    writer.CheckpointWriter.commit = slow_commit
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_to_run_is_passed_to_the_step(sig, tmp_path: Path, models: Path) -> None:
    """A real `weightsmith run` process: its step (a child process) is mid-write when the run
    gets the signal; the step must stop cleanly (no temporary left) and the run exit 1."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_COMMIT)
    marker = tmp_path / "step.pid"
    src = str(Path(weightsmith.__file__).parents[1])
    env = {**os.environ, "WEIGHTSMITH_TEST_SLOW_COMMIT": str(marker),
           "PYTHONPATH": os.pathsep.join([str(site), src, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    recipe = _recipe(tmp_path, [{"id": "first", "convert": {}, "input": "models/a"}])
    work = tmp_path / "work"
    run = subprocess.Popen(
        [sys.executable, "-m", "weightsmith", "run", str(recipe), "-o", str(work), "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "the step never reached its write"
            time.sleep(0.1)
        step_pid = int(marker.read_text())
        assert list(work.glob(".first.weightsmith-tmp-*"))  # mid-write
        run.send_signal(sig)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert not list(work.glob(".*weightsmith-tmp-*")), list(work.iterdir())
    assert run.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith(f"error: interrupted by {sig.name}"), err
    assert not (work / "first").exists()
    if Path("/proc").is_dir():
        assert not Path(f"/proc/{step_pid}").exists()  # the step was waited for, not orphaned


# ------------------------------------------------------------------ --resume (section 5)
def _tensors_sha(model: Path) -> str:
    tensors = load_file(str(model / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _two_step_run(tmp_path: Path, models: Path) -> tuple[Path, Path]:
    steps = [{"id": "first", "convert": {}, "input": "models/a"},
             {"id": "second", "convert": {"dtype": "bfloat16"}}]  # fmt: skip
    recipe, work = _recipe(tmp_path, steps), tmp_path / "work"
    result = _run(recipe, work)
    assert result.exit_code == 0, result.output
    return recipe, work


def _resume(recipe: Path, work: Path, tmp_path: Path) -> tuple[str, list[bool]]:
    report = tmp_path / "report.json"
    result = _run(recipe, work, "--resume", "--report", str(report))
    assert result.exit_code == 0, result.output
    return result.output, [s["skipped"] for s in json.loads(report.read_text())["steps"]]


def test_resume_reruns_a_step_whose_output_was_replaced(tmp_path: Path, models: Path) -> None:
    recipe, work = _two_step_run(tmp_path, models)
    good = _tensors_sha(work / "first")
    other = convert(models / "b", tmp_path / "other", progress=False).out  # same shapes
    shutil.copy(Path(other) / "model.safetensors", work / "first" / "model.safetensors")
    assert _tensors_sha(work / "first") != good
    output, skipped = _resume(recipe, work, tmp_path)
    assert "[first]" in output and "re-running the step" in output
    assert skipped[0] is False  # rebuilt from models/a, not trusted by its name
    assert _tensors_sha(work / "first") == good
    assert skipped[1] is True  # same content as before the tampering: still up to date


def test_resume_reruns_a_step_whose_output_was_truncated(tmp_path: Path, models: Path) -> None:
    recipe, work = _two_step_run(tmp_path, models)
    good = _tensors_sha(work / "second")
    shard = work / "second" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    output, skipped = _resume(recipe, work, tmp_path)
    assert "[second]" in output and "re-running the step" in output
    assert skipped == [True, False]
    assert _tensors_sha(work / "second") == good


# ------------------------------------------------------------------ translation (issue #15)
def test_child_and_in_process_translation_agree(tmp_path: Path, models: Path) -> None:
    """The pipeline asks the `weightsmith` program (a child process) for command lines; the
    `run` command answers in-process. Both must give the same lines and the same problems."""
    from functools import partial

    from weightsmith.cli.recipe_steps import translate_steps
    from weightsmith.pipeline.commands import StepRequest, translate_in_child

    requests = [
        StepRequest(["compress", "quantize"], [str(models / "a")],
                    {"bits": 4, "sym": False, "ignore": ["lm_head"]}, str(tmp_path / "q"), False),
        StepRequest(["merge", "slerp"], [str(models / "a"), str(models / "b")],
                    {"t": [0.5], "bitz": 1}, str(tmp_path / "m")),
        StepRequest(["compress", "teleport"], [], {}),
    ]  # fmt: skip
    child = translate_in_child(requests)
    assert child == partial(translate_steps, cli)(requests)
    assert child[0].problems == [] and child[0].argv == [
        str(models / "a"), "--bits", "4", "--asym", "--ignore", "lm_head",
        "-o", str(tmp_path / "q"), "--no-progress",
    ]  # fmt: skip
    assert child[1].problems == ["unknown option 'bitz'"]
    assert child[2].problems == ["`weightsmith compress teleport` does not exist here"]
