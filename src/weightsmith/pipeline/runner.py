"""Run a recipe: validate every step against its CLI command, then run the steps in order
as subprocesses (own progress bars, own peak memory), resumable and gated."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from weightsmith.core.report import write_report
from weightsmith.errors import CheckpointError, ConfigError, WeightsmithError
from weightsmith.io.sizes import format_size
from weightsmith.pipeline.gates import check_gates, validate_gates
from weightsmith.pipeline.recipe import Recipe, Step, load_recipe
from weightsmith.pipeline.steps import PATH_KEYS, STEP_KINDS

STATE_DIR = ".weightsmith-run"


@dataclass
class PlannedStep:
    step: Step
    command: list[str]  # path under `weightsmith` + arguments, without --report/--force
    input: Path | None
    output: Path  # where the model ends up (the input, for steps that only measure)
    depends: list[str] = field(default_factory=list)  # ids of earlier steps it reads
    reference: Path | None = None  # the model its output is measured against in plots


def _command_for(path: tuple[str, ...]) -> click.Command:
    from weightsmith.cli.main import cli

    cmd: click.Command = cli
    for name in path:
        sub = cmd.commands.get(name) if isinstance(cmd, click.Group) else None
        if sub is None:
            raise KeyError(" ".join(path))
        cmd = sub
    return cmd


def _option_args(cmd: click.Command, key: str, value: Any) -> list[str]:
    """``group_size: 32`` -> ``["--group-size", "32"]`` using the command's own option."""
    param = next((p for p in cmd.params if p.name == key.replace("-", "_")), None)
    if not isinstance(param, click.Option):
        raise ConfigError(f"unknown option {key!r}")
    flag = max(param.opts, key=len)
    if param.is_flag and not param.multiple:
        if param.secondary_opts:
            return [flag if value else max(param.secondary_opts, key=len)]
        return [flag] if value else []
    values = value if param.multiple and isinstance(value, list) else [value]
    out: list[str] = []
    for v in values:
        if isinstance(v, dict):
            out += [a for k, x in v.items() for a in (flag, f"{k}={_scalar(x)}")]
        else:
            out += [flag, _scalar(v)]
    return out


def _scalar(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(_scalar(x) for x in v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def plan_recipe(recipe: Recipe, workdir: Path, progress: bool = True) -> list[PlannedStep]:
    """Resolve inputs and outputs and build each step's command line; check them all with
    click before anything runs, and report every problem in one error."""
    problems: list[str] = []
    outputs: dict[str, Path] = {}
    planned: list[PlannedStep] = []
    previous: Path | None = None
    for step in recipe.steps:
        where = f"step {step.id!r} ({step.kind})"
        kind = STEP_KINDS[step.kind]
        options = dict(step.options)
        depends: list[str] = []

        def resolve(value: Any, key: str, deps: list[str] = depends, where: str = where) -> Any:
            if isinstance(value, list):
                return [resolve(v, key) for v in value]
            if not isinstance(value, str) or key not in PATH_KEYS:
                return value
            if value in outputs:
                deps.append(value)
                return str(outputs[value])
            made_by = {str(p): sid for sid, p in outputs.items()}
            if value in made_by:  # an earlier step's output, passed on as this step's input
                deps.append(made_by[value])
                return value
            p = Path(os.path.expanduser(value))
            p = p if p.is_absolute() else recipe.base_dir / p
            if not p.exists():
                problems.append(f"{where}: {key} {value!r} is neither a step id nor a path "
                                f"that exists ({p})")  # fmt: skip
            return str(p)

        path = kind.command
        if kind.subcommand_key:
            sub = options.pop(kind.subcommand_key, kind.default_subcommand)
            if sub is None:
                problems.append(f"{where}: needs '{kind.subcommand_key}'")
                continue
            path = (*path, str(sub))
        try:
            cmd = _command_for(path)
        except KeyError:
            problems.append(f"{where}: `weightsmith {' '.join(path)}` does not exist here")
            continue
        if "out" in options:
            problems.append(f"{where}: outputs live in WORKDIR/{step.id}; remove 'out'")
            options.pop("out")

        if step.input is not None:
            inp: Path | None = Path(resolve(step.input, "input"))
        else:
            inp = previous
        positional: list[str] = []
        if "args" in options:
            args = options.pop("args")
            positional = [
                str(a) for a in resolve(args if isinstance(args, list) else [args], "args")
            ]
        elif kind.input_as == "positional":
            if inp is None:
                problems.append(f"{where}: has no input (first step: give 'input' or 'args')")
                continue
            positional = [str(inp)]
        if kind.input_as not in ("positional", "none") and kind.input_as not in options:
            if inp is None:
                problems.append(f"{where}: needs '{kind.input_as}' (or an earlier step)")
                continue
            options[kind.input_as] = str(inp)
        argv = list(positional)
        resolved: dict[str, Any] = {}
        for key, value in options.items():
            try:
                resolved[key] = resolve(value, key)
                argv += _option_args(cmd, key, resolved[key])
            except ConfigError as e:
                problems.append(f"{where}: {e}")
        out = workdir / step.id if kind.writes_model else (inp or workdir / step.id)
        if kind.writes_model:
            argv += ["-o", str(out)]
        if not progress and any(p.name == "progress" for p in cmd.params):
            argv.append("--no-progress")
        try:
            cmd.make_context(" ".join(path), list(argv), resilient_parsing=False)
        except click.ClickException as e:
            problems.append(f"{where}: {e.format_message()}")
        problems.extend(f"{where}: {p}" for p in validate_gates(step.gate, "reference" in options))
        outputs[step.id] = out
        previous = out
        reference = _weights_reference(kind.input_as, positional, resolved)
        planned.append(PlannedStep(step, [*path, *argv], inp, out, depends, reference))
    if problems:
        raise ConfigError(f"{recipe.path}: {len(problems)} problem(s): " + "; ".join(problems))
    return planned


def _weights_reference(input_as: str, positional: list[str], options: dict) -> Path | None:
    """What a step's new weights are compared with: its input model; for merges the
    ``base`` model, else the first one merged."""
    if input_as == "positional" or (input_as == "none" and not options.get("base")):
        first = positional[0] if positional else None
    else:
        first = options.get("base" if input_as == "none" else input_as)
    return Path(first) if isinstance(first, str) else None


def _path_fingerprint(path: Path) -> str:
    """Content identity of a model directory, adapter folder or data file."""
    if path.is_file():
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        from weightsmith.io.reader import open_checkpoint

        try:
            with open_checkpoint(path) as ckpt:
                return ckpt.fingerprint()
        except CheckpointError:
            h = hashlib.sha256()
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f.relative_to(path).as_posix().encode() + f.read_bytes())
            return "sha256:" + h.hexdigest()
    return "missing"


def _step_fingerprint(ps: PlannedStep, workdir: Path) -> str:
    """The step definition plus the content of everything it reads (not their locations)."""
    inputs = {}
    for arg in ps.command:
        p = Path(arg)
        if p.is_absolute() and p.exists() and not _is_within(p, workdir / ps.step.id):
            inputs[arg] = _path_fingerprint(p)
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


def _dir_size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


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
) -> dict:
    """Run every step of a recipe; raise :class:`WeightsmithError` naming the failed step or
    gate. Returns the run report (also the body of ``--report``). With ``plots``, also write
    PNG plots (and their numbers) of the steps that ran into that directory."""
    if plots is not None:
        from weightsmith.pipeline.plots import require_matplotlib

        require_matplotlib()  # before any work
    recipe = load_recipe(recipe_path)
    workdir = Path(workdir).absolute()
    planned = plan_recipe(recipe, workdir, progress=progress)
    state_dir = workdir / STATE_DIR
    if not dry_run and not resume and not force:
        existing = [ps.step.id for ps in planned if ps.step.kind != "eval" and ps.output.exists()]
        if existing:
            raise ConfigError(
                f"{workdir}: outputs of steps {existing} already exist; pass --resume to reuse "
                "matching ones or --force to redo them"
            )
    report: dict[str, Any] = {"recipe": str(recipe.path), "workdir": str(workdir), "steps": []}
    start = time.perf_counter()
    failure: str | None = None
    for ps in planned:
        sid = ps.step.id
        line = "weightsmith " + shlex.join(ps.command)
        entry: dict[str, Any] = {"id": sid, "kind": ps.step.kind, "command": line}
        report["steps"].append(entry)
        if dry_run:
            entry["skipped"] = False
            echo(f"[{sid}] {line}")
            continue
        fingerprint = _step_fingerprint(ps, workdir)
        state_file = state_dir / f"{sid}.json"
        if resume and state_file.exists():
            state = json.loads(state_file.read_text())
            if state.get("fingerprint") == fingerprint and (
                ps.step.kind == "eval" or ps.output.exists()
            ):
                entry.update(state["entry"], skipped=True)
                echo(f"[{sid}] up to date, skipped")
                if plots is not None and _measure_weights(ps, entry, echo):
                    write_report(state_file, {"fingerprint": fingerprint, "entry": entry})
                if not all(g["passed"] for g in entry.get("gates", [])):
                    failure = _gate_failure(sid, entry["gates"])
                    break
                continue
        echo(f"[{sid}] {line}")
        state_file.unlink(missing_ok=True)
        step_report = state_dir / f"{sid}.report.json"
        state_dir.mkdir(parents=True, exist_ok=True)
        step_report.unlink(missing_ok=True)
        cmdline = [sys.executable, "-m", "weightsmith", *ps.command, "--report", str(step_report)]
        if ps.step.kind != "eval" and ps.output.exists():
            cmdline.append("--force")  # replaced atomically only when the step succeeds
        t0 = time.perf_counter()
        proc = subprocess.run(cmdline)
        body = json.loads(step_report.read_text()) if step_report.exists() else {}
        entry.update(
            skipped=False, ok=proc.returncode == 0, wall_s=round(time.perf_counter() - t0, 3),
            peak_rss=body.get("peak_rss"), output=str(ps.output),
            output_size=_dir_size(ps.output), result=body.get("result"),
        )  # fmt: skip
        if proc.returncode != 0:
            failure = f"step {sid!r} ({ps.step.kind}) failed: {body.get('error') or f'exit {proc.returncode}'}"
            break
        if ps.step.gate:
            metrics = body.get("result") or {}
            gates = check_gates(ps.step.gate, metrics, _dir_size(ps.output))
            entry["gates"] = [asdict(g) for g in gates]
            for g in gates:
                echo(f"[{sid}] gate {g.name}: {'pass' if g.passed else 'FAIL'} ({g.message})")
        if ps.step.kind == "eval" and (entry["result"] or {}).get("reference"):
            entry["reference_size"] = _dir_size(Path(entry["result"]["reference"]))
        if plots is not None:
            _measure_weights(ps, entry, echo)
        write_report(state_file, {"fingerprint": fingerprint, "entry": entry})
        if not all(g["passed"] for g in entry.get("gates", [])):
            failure = _gate_failure(sid, entry["gates"])
            break
    report["ok"] = failure is None
    report["wall_s"] = round(time.perf_counter() - start, 3)
    if failure:
        report["error"] = failure
    if not dry_run:
        state_dir.mkdir(parents=True, exist_ok=True)
        if plots is not None:
            from weightsmith.pipeline.plots import write_recipe_plots

            report["plots"] = write_recipe_plots(report, plots)
            echo(f"wrote {len(report['plots'])} plot file(s) to {plots}")
        (workdir / "summary.md").write_text(markdown_summary(report), encoding="utf-8")
    if failure:
        raise RecipeFailed(failure, report)
    return report


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
        for g in s.get("gates", []):
            metrics += f"; gate {g['name']} {'pass' if g['passed'] else 'FAIL'}"
        rss = format_size(s["peak_rss"]) if s.get("peak_rss") else "–"
        size = format_size(s["output_size"]) if s.get("output_size") else "–"
        rows.append(f"| {s['id']} | {s['kind']} | {status} | {s.get('wall_s', '–')} | {rss} | "
                    f"{size} | {metrics} |")  # fmt: skip
    head = f"# weightsmith run: {'passed' if report.get('ok') else 'FAILED'}\n\n"
    tail = f"\n\n{report.get('error', '')}\n" if report.get("error") else "\n"
    return head + "\n".join(rows) + tail
