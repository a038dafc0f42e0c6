"""Peak memory of a streaming conversion stays near one tensor, whatever the model size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightsmith.io import CheckpointWriter, TensorSpec

TENSOR_MB = 16
TENSORS = 24  # a ~400 MB checkpoint of 16 MB tensors


def _baseline_rss() -> int:
    code = (
        "import resource, weightsmith.cli.main, weightsmith.convert; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    return int(subprocess.check_output([sys.executable, "-c", code], text=True))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, "float16"])
def test_convert_peak_memory_is_about_one_tensor(tmp_path: Path, dtype: str | None) -> None:
    src = tmp_path / "src"
    rows = TENSOR_MB * 10**6 // (4 * 1024)
    with CheckpointWriter(src, max_shard_size=100 * 10**6) as w:
        w.plan(
            [TensorSpec(f"model.layers.{i}.w", torch.float32, (rows, 1024)) for i in range(TENSORS)]
        )
        for i in range(TENSORS):
            w.write(f"model.layers.{i}.w", torch.full((rows, 1024), float(i)))
        w.commit()
    report = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "weightsmith", "convert", str(src), "-o", str(tmp_path / "out"),
           "--no-progress", "--report", str(report)]  # fmt: skip
    if dtype:
        cmd += ["--dtype", dtype]
    subprocess.run(cmd, check=True, capture_output=True)
    peak = json.loads(report.read_text())["peak_rss"]
    growth_mb = (peak - _baseline_rss()) / 1e6
    # input tensor + cast output + temporaries: a few tensors, never the 400 MB model
    assert growth_mb < 5 * TENSOR_MB, f"peak RSS grew {growth_mb:.0f} MB over start-up"


def test_peak_rss_is_this_program_s_own_not_its_parent_s() -> None:
    """ru_maxrss survives execve on Linux; a report must not show the launching process's peak."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    ballast = bytearray(800 << 20)  # the parent touches 800 MB before starting the command
    ballast[::4096] = b"\1" * len(ballast[::4096])
    code = "from weightsmith.core.report import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.check_output([sys.executable, "-c", code], text=True))
    del ballast
    assert child < 600 << 20, child  # the child itself (python + torch) is ~250 MB


@pytest.mark.parametrize(("given", "expected"), [(None, "1"), ("0", "0")])
def test_cli_turns_on_huge_pages_for_torch_unless_told(given, expected, monkeypatch) -> None:
    if given is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", given)
    code = "import os, weightsmith.cli.main; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == expected


def test_console_entry_freezes_gc_when_the_command_ends_but_tests_runner_does_not() -> None:
    """The console script (``cli()``) freezes what exists once the command is done, so Python's
    shutdown skips collecting torch's import-time objects (~0.5 s); ``cli.main`` (CliRunner,
    tests) must not freeze, or a test session would never free its models."""
    code = (
        "import gc\n"
        "from weightsmith.cli.main import cli\n"
        "for call in (lambda: cli.main(['--help']), lambda: cli(['--help'])):\n"
        "    try:\n"
        "        call()\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    print('FROZEN', gc.get_freeze_count() > 0)\n"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True).splitlines()
    assert [ln for ln in out if ln.startswith("FROZEN")] == ["FROZEN False", "FROZEN True"]


def test_streaming_unfreezes_gc_afterwards() -> None:
    """``stream_transform`` keeps the collector off existing objects only while it streams."""
    import gc

    from weightsmith.core.memory import frozen_gc

    before = gc.get_freeze_count()
    with frozen_gc():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == before
