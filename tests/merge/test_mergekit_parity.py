"""Same tensors as mergekit for the same recipe (runs mergekit from its own venv, .cache/peers/mergekit).

Slow: skipped when that venv is absent. Exact methods must agree within 1e-6 (float32);
DARE draws different random masks, so only the kept mass is compared (mergekit 0.1.5
rescales by the task vector's L1 norm, weightsmith by 1/density: equal in expectation).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from merge_testlib import run_cli, tensors

from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import peer_python, require_peer

MERGEKIT_PY = peer_python("mergekit")
EXAMPLES = Path(__file__).parents[2] / "examples" / "merge"

DRIVER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    config = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    run_merge(config, out, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _mergekit() -> None:
    require_peer("mergekit")


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """Every example run by mergekit (one process) and by weightsmith on tiny models."""
    root = tmp_path_factory.mktemp("parity")
    models = root / "models"
    build_tiny_model(models / "stories260K", "llama", seed=0, num_hidden_layers=5)
    build_tiny_model(models / "stories260K-shakespeare", "llama", seed=1, num_hidden_layers=5)
    extra = {
        "ties_two": {
            "merge_method": "ties",
            "base_model": "stories260K",
            "models": [
                {"model": "stories260K-shakespeare", "parameters": {"weight": 0.7, "density": 0.3}},
                {"model": "third", "parameters": {"weight": 0.5, "density": 0.6}},
            ],
            "dtype": "float32",
        },
        "task_arithmetic_two": {
            "merge_method": "task_arithmetic",
            "base_model": "stories260K",
            "models": [
                {"model": "stories260K-shakespeare", "parameters": {"weight": 0.7}},
                {"model": "third", "parameters": {"weight": [0.2, 0.9]}},
            ],
            "parameters": {"lambda": 1.5, "normalize": True},
            "dtype": "float32",
        },
    }
    build_tiny_model(models / "third", "llama", seed=2, num_hidden_layers=5)
    recipes = {p.stem: yaml.safe_load(p.read_text()) for p in EXAMPLES.glob("*.yaml")}
    recipes.update(extra)
    args, runs = [], {}
    for name, data in recipes.items():
        absolute = _absolutize(data, models)
        cfg = root / f"{name}.yml"
        cfg.write_text(yaml.safe_dump(absolute))
        mk, ws = root / f"mk-{name}", root / f"ws-{name}"
        args += [str(cfg), str(mk)]
        r = run_cli("run", cfg, "-o", ws)
        assert r.exit_code == 0, r.output
        runs[name] = (mk, ws, models)
    proc = subprocess.run(
        [str(MERGEKIT_PY), "-c", DRIVER, *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs


def _absolutize(data, models: Path):
    if isinstance(data, dict):
        return {
            k: (str(models / v) if k in ("model", "base_model") else _absolutize(v, models))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_absolutize(v, models) for v in data]
    return data


EXACT = ["linear", "slerp", "task_arithmetic", "ties", "passthrough", "ties_two", "task_arithmetic_two"]  # fmt: skip


@pytest.mark.parametrize("name", EXACT)
def test_same_tensors_as_mergekit(parity_runs, name):
    mk, ws, _ = parity_runs[name]
    a, b = tensors(mk), tensors(ws)
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6, msg=n)


def test_dare_ties_same_distribution_as_mergekit(parity_runs):
    mk, ws, models = parity_runs["dare_ties"]
    base = tensors(models / "stories260K")
    a, b = tensors(mk), tensors(ws)
    mk_mass = sum(float((a[n] - base[n]).abs().sum()) for n in base)
    ws_mass = sum(float((b[n] - base[n]).abs().sum()) for n in base)
    mk_kept = sum(int((a[n] != base[n]).sum()) for n in base)
    ws_kept = sum(int((b[n] != base[n]).sum()) for n in base)
    assert abs(ws_mass / mk_mass - 1) < 0.03  # L1 mass of the merged task vector
    assert abs(ws_kept / mk_kept - 1) < 0.03  # fraction of entries kept (density 0.5)
