"""Helpers of the CUDA-vs-CPU tests (see conftest.py)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from click.testing import CliRunner

from weightsmith.cli.main import cli
from weightsmith.compare import compare_checkpoints

OTHER = os.environ.get("WEIGHTSMITH_TEST_DEVICE", "cuda")  # the device compared with the CPU


def run(*args: object) -> dict:
    """Run ``weightsmith ARGS --report r.json`` (exit 0 required); the report's result."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        r = CliRunner().invoke(cli, [*map(str, args), "--no-progress", "--report", str(report)])
        assert r.exit_code == 0, r.output + _traceback(r)
        return json.loads(report.read_text()).get("result", {})


def _traceback(result) -> str:
    """The traceback of an exception that escaped the command (WEIGHTSMITH_DEBUG=1), or ""."""
    import traceback

    if result.exc_info is None or isinstance(result.exception, SystemExit):
        return ""
    return "".join(traceback.format_exception(*result.exc_info))


def on_both(tmp_path: Path, *args: object) -> dict[str, Path]:
    """``args`` run with ``--device cpu`` into ``tmp_path/cpu`` and with ``--device OTHER`` into
    ``tmp_path/other``: {"cpu": output, "other": output}."""
    outs = {"cpu": tmp_path / "cpu", "other": tmp_path / "other"}
    for label, dev in (("cpu", "cpu"), ("other", OTHER)):
        run(*args, "-o", outs[label], "--device", dev)
    return outs


def gap(src: Path, cpu: Path, cuda: Path) -> tuple[float, float]:
    """(‖cuda − cpu‖, ‖cpu − src‖) over every tensor the outputs share, dequantized: how far the
    device moves the result, next to how far the method moved the weights."""
    device = compare_checkpoints(cpu, cuda)
    method = compare_checkpoints(src, cpu)
    d = math.sqrt(sum(t["norm_diff"] ** 2 for t in device["tensors"]))
    m = math.sqrt(sum(t["norm_diff"] ** 2 for t in method["tensors"]))
    return d, m
