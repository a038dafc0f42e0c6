"""Run the same recipes through mergekit 0.1.5 (its peer venv) and ``weightsmith merge run``.

Shared by the geometric-method parity tests: tiny seeded models in a given dtype, recipes
written with absolute paths, mergekit driven in one subprocess for all of them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
import yaml
from merge_testlib import run_cli, tensors

from weightsmith.testing import build_tiny_model
from weightsmith.testing.peers import peer_python

DRIVER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    config = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    run_merge(config, out, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
"""
MODEL_NAMES = ("base", "ft1", "ft2", "ft3")


def tiny_models(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    """Four different seeded tiny Llamas (3 layers) in ``dtype``."""
    return {
        name: build_tiny_model(root / name, "llama", seed=seed, dtype=dtype, num_hidden_layers=3)
        for seed, name in enumerate(MODEL_NAMES)
    }


def absolutize(data, models: dict[str, Path]):
    """The recipe with every model name mapped to its folder."""
    if isinstance(data, dict):
        return {
            k: (str(models[v]) if k in ("model", "base_model") else absolutize(v, models))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [absolutize(v, models) for v in data]
    return data


def run_both(
    root: Path, recipes: dict[str, dict], models: dict[str, Path], *ws_args: str
) -> dict[str, tuple[Path, Path]]:
    """{name: (mergekit output, weightsmith output)} for every recipe."""
    args, runs = [], {}
    for name, data in recipes.items():
        cfg = root / f"{name}.yml"
        cfg.write_text(yaml.safe_dump(absolutize(data, models)))
        mk, ws = root / f"mk-{name}", root / f"ws-{name}"
        result = run_cli("run", cfg, "-o", ws, *ws_args)
        assert result.exit_code == 0, f"{name}: {result.output}"
        args += [str(cfg), str(mk)]
        runs[name] = (mk, ws)
    proc = subprocess.run(
        [str(peer_python("mergekit")), "-c", DRIVER, *args],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs


def compare(mk: Path, ws: Path, atol: float) -> None:
    """Same tensor names, dtypes and shapes; values within ``atol`` (0: the same bits)."""
    a, b = tensors(mk), tensors(ws)
    assert set(a) == set(b)
    for n in sorted(a):
        assert b[n].dtype == a[n].dtype, (n, b[n].dtype, a[n].dtype)
        if atol == 0:
            same = torch.equal(
                b[n].view(-1).view(torch.int16 if a[n].itemsize == 2 else torch.int32),
                a[n].view(-1).view(torch.int16 if a[n].itemsize == 2 else torch.int32),
            )
            if not same:
                diff = int((b[n] != a[n]).sum())
                raise AssertionError(f"{n}: {diff} of {a[n].numel()} entries differ")
        else:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=atol, msg=n)
