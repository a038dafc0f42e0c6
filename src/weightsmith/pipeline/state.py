"""What ``--resume`` trusts: per finished step, a fingerprint of its definition and of the
content of everything it read, and a fingerprint of the content of the output it wrote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from weightsmith.core.report import write_report
from weightsmith.errors import CheckpointError
from weightsmith.io.reader import open_checkpoint
from weightsmith.pipeline.plan import PlannedStep

STATE_DIR = ".weightsmith-run"


def path_fingerprint(path: Path) -> str:
    """Content identity of a model directory, adapter folder or data file."""
    if path.is_file():
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        try:
            with open_checkpoint(path) as ckpt:
                return ckpt.fingerprint()
        except CheckpointError:
            h = hashlib.sha256()
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f.relative_to(path).as_posix().encode() + f.read_bytes())
            return "sha256:" + h.hexdigest()
    return "missing"


def step_fingerprint(ps: PlannedStep, workdir: Path) -> str:
    """The step definition plus the content of everything it reads (not their locations)."""
    inputs = {}
    for arg in ps.command:
        p = Path(arg)
        if p.is_absolute() and p.exists() and not _is_within(p, workdir / ps.step.id):
            inputs[arg] = path_fingerprint(p)
    text = json.dumps(
        {"kind": ps.step.kind, "options": ps.step.options, "gate": ps.step.gate,
         "inputs": sorted(inputs.values())},
        sort_keys=True, default=str,
    )  # fmt: skip
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _is_within(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def state_file(workdir: Path, step_id: str) -> Path:
    return workdir / STATE_DIR / f"{step_id}.json"


def load_state(path: Path) -> dict | None:
    """A finished step's record, or None when there is none (or it is unreadable)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def save_state(path: Path, fingerprint: str, entry: dict, output: str | None) -> None:
    """Record a finished step: its fingerprint, report entry and its output's fingerprint."""
    write_report(path, {"fingerprint": fingerprint, "output": output, "entry": entry})
