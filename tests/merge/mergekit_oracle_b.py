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
        assert b[n].shape == a[n].shape, n
        if atol:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=atol, msg=n)
            continue
        bits = {2: torch.int16, 4: torch.int32}[a[n].element_size()]
        differ = int((b[n].view(bits) != a[n].view(bits)).sum())
        assert differ == 0, f"{n}: {differ} of {a[n].numel()} entries differ"


def _w(name: str, weight: float, **more: float) -> dict:
    return {"model": name, "parameters": {"weight": weight, **more}}


FINE = [{"model": "ft1"}, {"model": "ft2"}, {"model": "ft3"}]
GEOMETRIC = {
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": FINE},
    "model_stock_filter_wise": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": FINE[:2],
        "parameters": {"filter_wise": True},
    },
    "nuslerp": {"merge_method": "nuslerp", "models": [_w("ft1", 0.3), _w("ft2", 0.7)]},
    "nuslerp_base_columns": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": [_w("ft1", 1.0), _w("ft2", 2.0)],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "nuslerp_base_rows": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": [_w("ft1", 1.0), _w("ft2", 2.0)],
        "parameters": {"nuslerp_flatten": False},
    },
    "multislerp": {
        "merge_method": "multislerp",
        "models": [_w("ft1", 0.2), _w("ft2", 0.5), _w("ft3", 0.3)],
    },
    "multislerp_base": {
        "merge_method": "multislerp",
        "base_model": "base",
        "models": [_w("ft1", 1.0), _w("ft2", 2.0)],
        "parameters": {"normalize_weights": False, "eps": 1e-6},
    },
    "karcher": {"merge_method": "karcher", "models": FINE},
    "karcher_base": {
        "merge_method": "karcher",
        "base_model": "base",
        "models": FINE[:2],
        "parameters": {"max_iter": 5, "tol": 1e-6},
    },
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "base", "models": FINE[:1]},
    "ram": {"merge_method": "ram", "base_model": "base", "models": FINE[:2]},
    "ram_epsilon": {
        "merge_method": "ram",
        "base_model": "base",
        "models": FINE,
        "parameters": {"epsilon": 0.02},
    },
}
# the methods that were there before, for the bfloat16 arithmetic
CLASSIC = {
    "linear": {"merge_method": "linear", "models": [_w("ft1", 0.3), _w("ft2", 0.6)]},
    "slerp": {
        "merge_method": "slerp",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "ft1"}],
        "parameters": {"t": [0, 0.3, 1]},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [_w("ft1", 0.7), _w("ft2", 0.45)],
        "parameters": {"lambda": 1.3},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [_w("ft1", 0.7, density=0.3), _w("ft2", 0.5, density=0.6)],
    },
    "ties_normalize_off": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [_w("ft1", 1.0, density=0.5), _w("ft2", -0.5, density=0.2), _w("ft3", 0.3)],
        "parameters": {"normalize": False, "lambda": 0.8},
    },
}


def with_dtype(recipes: dict[str, dict], dtype: str, out_dtype: str | None = None) -> dict:
    """The recipes with ``dtype`` (and ``out_dtype``) set. mergekit returns arcee_fusion in
    float32 whatever the dtype, so its output dtype is pinned to ``dtype`` when none is given."""
    out = {}
    for name, r in recipes.items():
        r = {**r, "dtype": dtype}
        if out_dtype or name.startswith("arcee_fusion"):
            r["out_dtype"] = out_dtype or dtype
        out[name] = r
    return out


def perturbed(src: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """A copy of checkpoint ``src`` with seeded N(0, scale²) noise on every float tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(src.glob("*.safetensors")):
        state = load_file(shard)
        for name in sorted(state):
            t = state[name]
            if t.is_floating_point():
                state[name] = (t.float() + torch.randn(t.shape, generator=gen) * scale).to(t.dtype)
        save_file(state, out / shard.name, metadata={"format": "pt"})
    return out
