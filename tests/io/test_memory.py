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
