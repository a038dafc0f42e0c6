"""Run a recipe: plan and check every step first, then run the steps in order, each in its
own child process (own progress bar, own peak memory), resumable and gated."""

from __future__ import annotations

import os
import shlex
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError, ConfigError, WeightsmithError
from weightsmith.io.sizes import format_size
from weightsmith.pipeline.child import run_step_process
from weightsmith.pipeline.commands import PROGRAM, Translate
from weightsmith.pipeline.gates import check_gates
from weightsmith.pipeline.plan import PlannedStep, plan_recipe
from weightsmith.pipeline.recipe import load_recipe
from weightsmith.pipeline.state import (
    STATE_DIR,
    load_state,
    path_fingerprint,
    save_state,
    state_file,
    step_fingerprint,
)
from weightsmith.pipeline.steps import STEP_KINDS

__all__ = ["STATE_DIR", "PlannedStep", "RecipeFailed", "plan_recipe", "run_recipe"]


def run_recipe(
    recipe_path: str | os.PathLike[str],
    workdir: str | os.PathLike[str],
    *,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    plots: str | os.PathLike[str] | None = None,
    echo=print,
    translate: Translate | None = None,
) -> dict:
    """Run every step of a recipe; raise :class:`WeightsmithError` naming the failed step or
    gate. Returns the run report (also the body of ``--report``). With ``plots``, also write
    PNG plots (and their numbers) of the steps that ran into that directory. ``translate``
    turns steps into checked command lines (default: the ``weightsmith`` program, asked in a
    child process; see :mod:`weightsmith.pipeline.commands`)."""
    if plots is not None:
        from weightsmith.pipeline.plots import require_matplotlib

        require_matplotlib()  # before any work
    recipe = load_recipe(recipe_path)
    workdir = Path(workdir).absolute()
    planned = plan_recipe(recipe, workdir, progress=progress, translate=translate)
    _check_workdir(planned, workdir, plots, replace=dry_run or resume or force)
    report: dict[str, Any] = {"recipe": str(recipe.path), "workdir": str(workdir), "steps": []}
    start = time.perf_counter()
    failure: str | None = None
    for ps in planned:
        line = "weightsmith " + shlex.join(ps.command)
        entry: dict[str, Any] = {"id": ps.step.id, "kind": ps.step.kind, "command": line}
        report["steps"].append(entry)
        if dry_run:
            entry["skipped"] = False
            echo(f"[{ps.step.id}] {line}")
            continue
        failure = _resume_or_run(ps, entry, workdir, resume, plots is not None, echo)
        if failure:
            break
    report["ok"] = failure is None
    report["wall_s"] = round(time.perf_counter() - start, 3)
    if failure:
        report["error"] = failure
    if not dry_run:
        _write_summary(report, workdir, plots, echo)
    if failure:
        raise RecipeFailed(failure, report)
    return report


def _check_workdir(
    planned: list[PlannedStep], workdir: Path, plots: str | os.PathLike[str] | None, replace: bool
) -> None:
    """Refuse, before any work, to overwrite earlier outputs unasked or to put plots where a
    step's output goes."""
    if not replace:
        existing = [ps.step.id for ps in planned if ps.step.kind != "eval" and ps.output.exists()]
        if existing:
            raise ConfigError(
                f"{workdir}: outputs of steps {existing} already exist; pass --resume to reuse "
                "matching ones or --force to redo them"
            )
    if plots is None:
        return
    plots_dir = Path(plots).absolute()
    for name in [STATE_DIR, *(ps.step.id for ps in planned)]:
        taken = workdir / name
        if plots_dir == taken or taken in plots_dir.parents:
            raise ConfigError(f"--plots {plots}: inside {taken}, which the run writes itself; "
                              "choose another directory")  # fmt: skip


def _resume_or_run(
    ps: PlannedStep, entry: dict, workdir: Path, resume: bool, plots: bool, echo
) -> str | None:
    """Skip the step when ``--resume`` finds it up to date, else run it; the failure message
    of the step or of its gates, None when it passed."""
    sid = ps.step.id
    fingerprint = step_fingerprint(ps, workdir)
    sfile = state_file(workdir, sid)
    state = load_state(sfile) if resume else None
    if state is not None and _up_to_date(ps, state, fingerprint, echo):
        entry.update(state["entry"], skipped=True)
        echo(f"[{sid}] up to date, skipped")
        if plots and _measure_weights(ps, entry, echo):
            save_state(sfile, fingerprint, entry, state.get("output"))
    else:
        failure = _run_step(ps, entry, sfile, plots, echo)
        if failure:
            return failure
        writes = STEP_KINDS[ps.step.kind].writes_model
        save_state(sfile, fingerprint, entry, path_fingerprint(ps.output) if writes else None)
    if not all(g["passed"] for g in entry.get("gates", [])):
        return _gate_failure(sid, entry["gates"])
    return None


def _up_to_date(ps: PlannedStep, state: dict, fingerprint: str, echo) -> bool:
    """Same definition and inputs as when the step finished, and (for steps that write a
    model) an output whose content is still what the step wrote."""
    if state.get("fingerprint") != fingerprint or not isinstance(state.get("entry"), dict):
        return False
    if not STEP_KINDS[ps.step.kind].writes_model:
        return True
    if not ps.output.exists():
        return False
    if state.get("output") != path_fingerprint(ps.output):
        echo(f"[{ps.step.id}] {ps.output} does not match the content fingerprint recorded when "
             "the step finished (changed or truncated since); re-running the step")  # fmt: skip
        return False
    return True


def _run_step(ps: PlannedStep, entry: dict, sfile: Path, plots: bool, echo) -> str | None:
    """Run one step in its own process and record what it reported; its failure, or None."""
    sid, kind = ps.step.id, ps.step.kind
    echo(f"[{sid}] {entry['command']}")
    sfile.unlink(missing_ok=True)
    sfile.parent.mkdir(parents=True, exist_ok=True)
    step_report = sfile.with_name(f"{sid}.report.json")
    step_report.unlink(missing_ok=True)
    cmdline = [*PROGRAM, *ps.command, "--report", str(step_report)]
    if STEP_KINDS[kind].writes_model and ps.output.exists():
        cmdline.append("--force")  # replaced atomically only when the step succeeds
    t0 = time.perf_counter()
    returncode, signum = run_step_process(cmdline)
    body = load_state(step_report) or {}
    entry.update(
        skipped=False, ok=returncode == 0 and signum is None,
        wall_s=round(time.perf_counter() - t0, 3), peak_rss=body.get("peak_rss"),
        output=str(ps.output), output_size=_dir_size(ps.output), result=body.get("result"),
    )  # fmt: skip
    if signum is not None:
        return (f"interrupted by {signal.Signals(signum).name} during step {sid!r}: passed it "
                f"on to the step and waited for it to stop (exit {returncode})")  # fmt: skip
    if returncode != 0:
        return f"step {sid!r} ({kind}) failed: {body.get('error') or f'exit {returncode}'}"
    if ps.step.gate:
        gates = check_gates(ps.step.gate, body.get("result") or {}, _dir_size(ps.output))
        entry["gates"] = [asdict(g) for g in gates]
        for g in gates:
            echo(f"[{sid}] gate {g.name}: {'pass' if g.passed else 'FAIL'} ({g.message})")
    if kind == "eval" and (entry["result"] or {}).get("reference"):
        entry["reference_size"] = _dir_size(Path(entry["result"]["reference"]))
    if plots:
        _measure_weights(ps, entry, echo)
    return None


def _write_summary(report: dict, workdir: Path, plots, echo) -> None:
    """``WORKDIR/summary.md`` and, when asked, the plots of the run."""
    (workdir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    if plots is not None:
        from weightsmith.pipeline.plots import write_recipe_plots

        report["plots"] = write_recipe_plots(report, plots)
        echo(f"wrote {len(report['plots'])} plot file(s) to {plots}")
    (workdir / "summary.md").write_text(markdown_summary(report), encoding="utf-8")


def _dir_size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _measure_weights(ps: PlannedStep, entry: dict, echo) -> bool:
    """Record in ``entry["weights"]`` how a weight-changing step's output differs from its
    reference, per decoder layer (for plots); True when it was measured now."""
    if "weights" in entry or not STEP_KINDS[ps.step.kind].writes_model:
        return False
    if ps.reference is None or not ps.output.exists():
        entry["weights"] = {"skipped": "no input model to compare with"}
        return True
    from weightsmith.pipeline.plots import weight_change

    try:
        entry["weights"] = weight_change(ps.reference, ps.output)
    except CheckpointError as e:
        entry["weights"] = {"skipped": str(e)}
    if not (entry["weights"].get("layers")):
        reason = entry["weights"].get("skipped") or "no decoder-layer weights in common"
        echo(f"[{ps.step.id}] no per-layer plot: {reason}")
    return True


class RecipeFailed(WeightsmithError):
    """A step or gate failed; ``report`` holds what ran."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


def _gate_failure(sid: str, gates: list[dict]) -> str:
    failed = [g for g in gates if not g["passed"]]
    return f"gate failed at step {sid!r}: " + "; ".join(
        f"{g['name']}: {g['message']}" for g in failed
    )


def markdown_summary(report: dict) -> str:
    """A short Markdown table of the run, for CI job summaries."""
    rows = ["| step | kind | status | wall s | peak RSS | output size | metrics |",
            "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
    for s in report["steps"]:
        status = "skipped (up to date)" if s.get("skipped") else ("ok" if s.get("ok") else "FAILED")
        result = s.get("result") or {}
        metrics = ", ".join(
            f"{k} {result[k]:.4g}" for k in ("ppl", "reference_ppl", "kl", "top1_agreement", "accuracy")
            if isinstance(result.get(k), (int, float))
        )  # fmt: skip
        for task, metric in (result.get("primary") or {}).items():  # eval tasks (lm-eval)
            value = (result.get("scores") or {}).get(task, {}).get(metric)
            metrics += (
                f"{', ' if metrics else ''}{task} {metric} {value:.4g}" if value is not None else ""
            )
        for g in s.get("gates", []):
            metrics += f"; gate {g['name']} {'pass' if g['passed'] else 'FAIL'}"
        rss = format_size(s["peak_rss"]) if s.get("peak_rss") else "–"
        size = format_size(s["output_size"]) if s.get("output_size") else "–"
        rows.append(f"| {s['id']} | {s['kind']} | {status} | {s.get('wall_s', '–')} | {rss} | "
                    f"{size} | {metrics} |")  # fmt: skip
    head = f"# weightsmith run: {'passed' if report.get('ok') else 'FAILED'}\n\n"
    tail = f"\n\n{report.get('error', '')}\n" if report.get("error") else "\n"
    return head + "\n".join(rows) + tail
