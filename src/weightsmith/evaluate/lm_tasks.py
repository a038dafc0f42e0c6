"""Benchmark scores with lm-evaluation-harness (the optional ``eval`` extra).

The model is loaded the way every weightsmith command loads one (so anything transformers
loads works: plain safetensors, compressed-tensors, ...) and handed to lm-eval's ``HFLM`` as a
model object; lm-eval's ``simple_evaluate`` then scores the tasks. Scores are read back as
``{task: {metric: value, metric_stderr: value}}`` (lm-eval's ``"acc,none"`` keys with the
default filter shortened to ``acc``; another filter stays as ``acc,strict-match``).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

from weightsmith.core.device import select_device
from weightsmith.core.models import load_model, load_tokenizer
from weightsmith.core.report import peak_rss_bytes
from weightsmith.errors import ConfigError

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'weightsmith[eval]'"


@dataclass(frozen=True)
class TaskScores:
    """What :func:`evaluate_tasks` measured. ``primary`` names each task's first metric (the
    one a gate uses when it names only the task)."""

    model: str
    tasks: list[str]
    scores: dict[str, dict[str, float | None]]
    primary: dict[str, str]
    samples: dict[str, int]
    limit: int | None
    wall_s: float
    peak_rss: int
    lm_eval_version: str
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    reference: str | None = None
    reference_scores: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def require_lm_eval():
    """The ``lm_eval`` module, or a one-line error saying how to install it."""
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return lm_eval


def parse_task_list(tasks: str | list[str]) -> list[str]:
    """``"a,b"`` (or a list of such) -> ``["a", "b"]``, without blanks or repeats."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks: name at least one lm-eval task")
    return list(dict.fromkeys(names))


def task_manager(tasks: list[str], include_path: str | os.PathLike[str] | None = None):
    """lm-eval's ``TaskManager`` (with ``include_path``'s YAML tasks), after checking that
    every task exists; raises naming the unknown ones before any model loads."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"--include-path {include_path}: not a directory")
    tm = TaskManager(verbosity="ERROR", include_path=None if include_path is None
                     else str(include_path))  # fmt: skip
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" (nor in --include-path {include_path})" if include_path else ""
        raise ConfigError(f"unknown lm-eval task(s): {', '.join(unknown)}: not among lm-eval's "
                          f"{len(known)} tasks{where}")  # fmt: skip
    return tm


def read_scores(results: dict) -> tuple[dict, dict, dict]:
    """lm-eval's ``simple_evaluate`` output -> (scores, primary metric, sample counts)."""
    scores: dict[str, dict[str, float | None]] = {}
    primary: dict[str, str] = {}
    for task, row in results["results"].items():
        out: dict[str, float | None] = {}
        for key, value in row.items():
            if "," not in key:
                continue  # alias, name, sample_len
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric},{filt}"
            out[name] = _number(value)
            if not metric.endswith("_stderr"):
                primary.setdefault(task, name)
        scores[task] = out
    samples = {t: int(v.get("effective", 0)) for t, v in results.get("n-samples", {}).items()}
    return scores, primary, samples


def _number(value) -> float | None:
    """A finite float, or None (lm-eval writes ``"N/A"`` for a missing stderr)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def run_lm_eval(model_dir, tasks: list[str], tm, *, limit: int | None, batch_size: int,
                device: str) -> dict:  # fmt: skip
    """Load ``model_dir`` and score it with lm-eval's ``simple_evaluate`` (greedy, seeded)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    dev = select_device(device)
    model = load_model(model_dir, dev)
    tok = load_tokenizer(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(dev))
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=tm,
                           log_samples=False, verbosity="ERROR")  # fmt: skip


def evaluate_tasks(
    model_dir: str | os.PathLike[str], tasks: str | list[str], *, limit: int | None = None,
    include_path: str | os.PathLike[str] | None = None, batch_size: int = 1,
    device: str = "auto", reference: str | os.PathLike[str] | None = None,
) -> TaskScores:  # fmt: skip
    """Score ``model_dir`` (and ``reference``, when given) on lm-eval ``tasks``."""
    start = time.perf_counter()
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1 (got {limit})")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {batch_size})")
    names = parse_task_list(tasks)
    lm_eval = require_lm_eval()
    tm = task_manager(names, include_path)
    kw = {"limit": limit, "batch_size": batch_size, "device": device}
    raw = run_lm_eval(model_dir, names, tm, **kw)
    scores, primary, samples = read_scores(raw)
    ref_scores: dict = {}
    if reference is not None:
        ref_scores = read_scores(run_lm_eval(reference, names, tm, **kw))[0]
    return TaskScores(
        model=str(model_dir), tasks=names, scores=scores, primary=primary, samples=samples,
        higher_is_better={t: {m: bool(b) for m, b in d.items()}
                          for t, d in raw.get("higher_is_better", {}).items()},
        limit=limit, wall_s=round(time.perf_counter() - start, 3), peak_rss=peak_rss_bytes(),
        lm_eval_version=getattr(lm_eval, "__version__", "unknown"),
        reference=None if reference is None else str(reference), reference_scores=ref_scores,
    )  # fmt: skip
