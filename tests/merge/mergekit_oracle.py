"""mergekit 0.1.5 as an oracle: run recipes through it (its own venv) and through weightsmith.

Imported as a plain module by the parity tests in this folder. mergekit runs all recipes in
one subprocess (its import is the slow part) with ``random_seed`` set, so its randomised
methods are reproducible too. The seed must differ from the seeds the tiny models were drawn
with: mergekit's masks come from torch's global generator, and with the same seed the "random"
mask would replay the base model's weights (and correlate with |δ|).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from merge_testlib import run_cli

from weightsmith.testing.peers import peer_python

DRIVER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
seed, lora_cache = int(sys.argv[1]), sys.argv[2]
for cfg, out in zip(sys.argv[3::2], sys.argv[4::2]):
    config = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    options = MergeOptions(
        copy_tokenizer=False, lazy_unpickle=False, random_seed=seed, lora_merge_cache=lora_cache
    )
    run_merge(config, out, options=options)
"""


def absolutize(data: Any, models: Path) -> Any:
    """``data`` with every ``model``/``base_model`` name made a path under ``models`` (both
    halves of a ``MODEL+ADAPTER`` reference)."""
    if isinstance(data, Mapping):
        return {
            k: (
                "+".join(str(models / p) for p in v.split("+"))
                if k in ("model", "base_model")
                else absolutize(v, models)
            )
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [absolutize(v, models) for v in data]
    return data


def run_both(
    recipes: Mapping[str, Mapping], models: Path, root: Path, seed: int = 9973
) -> dict[str, tuple[Path, Path]]:
    """{name: (mergekit output, weightsmith output)} for every recipe (names relative to
    ``models``); weightsmith runs in-process through ``merge run``."""
    args: list[str] = []
    runs = {}
    for name, data in recipes.items():
        cfg = root / f"{name}.yml"
        cfg.write_text(yaml.safe_dump(absolutize(data, models)))
        mk, ws = root / f"mk-{name}", root / f"ws-{name}"
        r = run_cli("run", cfg, "-o", ws)
        assert r.exit_code == 0, r.output
        args += [str(cfg), str(mk)]
        runs[name] = (mk, ws)
    proc = subprocess.run(
        [str(peer_python("mergekit")), "-c", DRIVER, str(seed), str(root / "mk-lora"), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs
