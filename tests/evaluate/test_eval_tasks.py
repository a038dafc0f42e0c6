"""`weightsmith eval tasks` (lm-evaluation-harness) against lm-eval's own `simple_evaluate`.

Oracle: lm-eval called directly, loading the model from its path with its own HFLM loader
(float32, CPU, batch 1, same task and limit). The scores must be IDENTICAL (exact float
equality): both run the same loglikelihood requests on the same weights, in the same order.
The task is the shipped tests/data/lmeval/tiny_choice.yaml (10 multiple-choice items over a
local JSONL file), run offline.
"""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from weightsmith.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = ROOT / "tests" / "data" / "lmeval"
TASK = "weightsmith_tiny_choice"

pytestmark = pytest.mark.slow


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        reason = "lm_eval not installed (pip install 'weightsmith[eval]')"
        if os.environ.get("WEIGHTSMITH_REQUIRE_PEERS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network, a private datasets cache, and the repository root as the working directory
    (the task YAML names its JSONL file relative to it)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.chdir(ROOT)


def direct_scores(model: Path, limit: int | None = None) -> dict:
    """The oracle: lm-eval's simple_evaluate on the model path."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model), device="cpu", batch_size=1, dtype="float32")
    tm = TaskManager(include_path=str(TASK_DIR))
    out = simple_evaluate(model=lm, tasks=[TASK], limit=limit, task_manager=tm, log_samples=False)
    return out["results"][TASK]


def cli_scores(model: Path, report: Path, *extra: str) -> dict:
    res = CliRunner().invoke(cli, ["eval", "tasks", str(model), "--tasks", TASK,
                                   "--include-path", str(TASK_DIR), "--device", "cpu",
                                   "--report", str(report), *extra])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"{TASK} acc " in res.output.strip().splitlines()[-1]
    return json.loads(report.read_text())["result"]


def assert_identical(ours: dict, direct: dict) -> None:
    scores = ours["scores"][TASK]
    expected = {k.split(",")[0]: v for k, v in direct.items() if k.endswith(",none")}
    assert set(scores) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert scores == expected  # exact equality, not a tolerance
    assert ours["primary"][TASK] == "acc"


def test_plain_checkpoint_scores_equal_simple_evaluate(tiny_model, tmp_path: Path) -> None:
    _require_lm_eval()
    model = tiny_model("llama", seed=3)
    ours = cli_scores(model, tmp_path / "r.json")
    assert_identical(ours, direct_scores(model))
    assert ours["samples"] == {TASK: 10}
    assert ours["higher_is_better"][TASK] == {"acc": True, "acc_norm": True}


def test_compressed_tensors_and_limit_equal_simple_evaluate(tiny_model, tmp_path: Path) -> None:
    """A weightsmith output in compressed-tensors format (RTN 4-bit), scored on 6 items."""
    _require_lm_eval()
    out = tmp_path / "w4"
    res = CliRunner().invoke(cli, ["compress", "quantize", str(tiny_model("llama", seed=3)),
                                   "-o", str(out), "--method", "rtn", "--bits", "4",
                                   "--group-size", "32"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]
    ours = cli_scores(out, tmp_path / "r.json", "--limit", "6")
    assert_identical(ours, direct_scores(out, limit=6))
    assert ours["samples"] == {TASK: 6}


def test_unknown_task_is_one_line_error_before_loading(tmp_path: Path) -> None:
    _require_lm_eval()
    not_a_model = tmp_path / "not-a-model"  # loading it would fail: no config.json
    not_a_model.mkdir()
    res = CliRunner().invoke(cli, ["eval", "tasks", str(not_a_model),
                                   "--tasks", f"{TASK},no_such_task_xyz",
                                   "--include-path", str(TASK_DIR)])  # fmt: skip
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("error: unknown lm-eval task(s): no_such_task_xyz")
    assert "config.json" not in res.output  # the model was never loaded


def test_missing_lm_eval_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:  # fmt: skip
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    res = CliRunner().invoke(cli, ["eval", "tasks", str(tmp_path), "--tasks", TASK])
    assert res.exit_code == 1
    assert res.output.strip() == (
        "error: lm-evaluation-harness is not installed: pip install 'weightsmith[eval]'"
    )
