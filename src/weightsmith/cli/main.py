"""``weightsmith`` and its shortcut commands ``compress``, ``merge`` and ``distill``."""

from __future__ import annotations

import gc

# Importing torch makes about 10^5 long-lived objects, and Python's collector ran over them
# while they were made (0.09 s of a short command). Nothing is collected while the command
# line's modules import; what they made then joins the oldest generation without a scan, and
# collection resumes as it was. The console entry freezes them out of later collections
# (WsGroup.__call__); an importer such as a test session keeps nothing frozen.
_GC_WAS_ENABLED = gc.isenabled()
gc.disable()

import functools
import json
import sys

import click

from weightsmith.cli.common import (
    MODEL,
    allow_pickle_option,
    download_option,
    force_option,
    max_shard_size_option,
    progress_option,
    report_option,
)
from weightsmith.cli.gguf_options import gguf_options, write_gguf_file
from weightsmith.cli.groups import cli, compress_cli, distill_cli, eval_cli, merge_cli
from weightsmith.errors import ConfigError
from weightsmith.io.sizes import format_size, parse_size

gc.freeze()  # freeze, then unfreeze: what the imports made moves to the oldest generation
gc.unfreeze()  # unscanned, instead of being scanned by the next young collection (0.06 s)
if _GC_WAS_ENABLED:
    gc.enable()


@cli.command("inspect")
@click.argument("path", type=MODEL)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@allow_pickle_option
@report_option
def inspect_cmd(path: str, as_json: bool, allow_pickle: bool) -> dict:
    """Show what the checkpoint at PATH holds (reads headers only)."""
    from weightsmith.inspection import format_inspection, inspect_checkpoint

    info = inspect_checkpoint(path, allow_pickle=allow_pickle)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))
    return {"result": info}


@cli.command("convert")
@click.argument("path", type=MODEL)
@click.option(
    "-o", "--out", required=True, type=click.Path(),
    help="Output directory (a .gguf file with --format gguf).",
)  # fmt: skip
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default=None,
    help="Cast floating-point tensors (default: keep, bit-exact).",
)
@click.option(
    "--format",
    "format",
    type=click.Choice(["safetensors", "gguf"]),
    default="safetensors",
    show_default=True,
    help="Output format: a safetensors folder, or one GGUF file for llama.cpp/Ollama.",
)
@click.option(
    "--calib", type=click.Path(dir_okay=False), default=None,
    help="GGUF: collect an importance matrix from this text (.txt/.jsonl), layer by layer.",
)  # fmt: skip
@click.option("--calib-samples", default=128, show_default=True, help="Calibration windows.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per calibration window.")
@gguf_options
@max_shard_size_option
@force_option
@allow_pickle_option
@progress_option
@report_option
def convert_cmd(
    path: str,
    out: str,
    dtype: str | None,
    max_shard_size: str,
    force: bool,
    allow_pickle: bool,
    progress: bool,
    **gguf_options,  # --format, --type, --calib, ... (recipe keys: format, type, calib, ...)
) -> dict:
    """Re-shard and/or cast the checkpoint at PATH into OUT (a folder, or a .gguf file)."""
    from weightsmith.convert import convert

    out_format, gguf_type = gguf_options["format"], gguf_options["type"]
    imatrix_keys = ("calib", "imatrix", "save_imatrix")
    if out_format == "gguf" or gguf_type is not None:
        return _convert_gguf(path, out, gguf_options, dtype, force, allow_pickle, progress)
    if any(gguf_options[k] for k in imatrix_keys):
        raise ConfigError("--calib/--imatrix/--save-imatrix apply to --format gguf only")
    result = convert(
        path,
        out,
        dtype=dtype,
        max_shard_size=parse_size(max_shard_size),
        force=force,
        allow_pickle=allow_pickle,
        progress=progress,
    )
    shards = len(result.shards)
    click.echo(
        f"converted {result.tensors} tensors ({format_size(result.total_size)}) into {shards} "
        f"shard{'s' if shards != 1 else ''} in {result.wall_s:.1f} s, peak RSS "
        f"{format_size(result.peak_rss)} -> {result.out}"
    )
    return {"input": path, "output": result.out, "result": result.to_dict()}


def _convert_gguf(path, out, opts: dict, dtype, force, allow_pickle, progress) -> dict:
    from weightsmith.convert import ImatrixOptions

    importance = ImatrixOptions(
        imatrix=opts["imatrix"], calib=opts["calib"], samples=opts["calib_samples"],
        seq_len=opts["seq_len"], save=opts["save_imatrix"],
    )  # fmt: skip
    if opts["format"] != "gguf":
        raise ConfigError("--type is a GGUF tensor type: add --format gguf")
    if dtype is not None:
        raise ConfigError("--dtype does not apply to --format gguf: use --type F32/F16/BF16")
    return write_gguf_file(
        path, out, opts["type"] or "F16", importance, force=force, allow_pickle=allow_pickle,
        progress=progress,
    )  # fmt: skip


@cli.command("compare")
@click.argument("a", type=MODEL)
@click.argument("b", type=MODEL)
@click.option("--top", default=20, show_default=True, help="Rows in the table.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write a PNG of every tensor's difference by layer (numbers beside it as .json/.csv; needs weightsmith[plots]).",
)
@report_option
def compare_cmd(a: str, b: str, top: int, as_json: bool, plot: str | None) -> dict:
    """Show how checkpoint B differs from A, tensor by tensor (relative L2, cosine, max |Δ|)."""
    from weightsmith.compare import compare_checkpoints, format_comparison

    if plot is not None:
        from weightsmith.core.report import check_report_path
        from weightsmith.pipeline.plots import require_matplotlib

        require_matplotlib()
        check_report_path(plot, what="plot")  # before the comparison's work
    result = compare_checkpoints(a, b)
    click.echo(json.dumps(result, indent=2) if as_json else format_comparison(result, top))
    summary = {k: v for k, v in result.items() if k != "tensors"}
    if plot is not None:
        from weightsmith.pipeline.plots import plot_comparison

        summary["plots"] = plot_comparison(result, plot)
        click.echo(f"plot -> {plot}", err=as_json)
    return {"result": summary}


@cli.command("run")
@click.argument("recipe", type=click.Path())
@click.option("-o", "--workdir", required=True, type=click.Path(), help="Step outputs go here.")
@click.option("--resume", is_flag=True, help="Skip steps whose inputs and settings are unchanged.")
@click.option("--force", is_flag=True, help="Redo steps whose outputs already exist.")
@click.option("--dry-run", is_flag=True, help="Validate and print the commands; run nothing.")
@download_option
@click.option(
    "--plots",
    type=click.Path(file_okay=False),
    default=None,
    help="Write PNG plots here: per-layer weight error/sparsity per step, size vs perplexity (needs weightsmith[plots]).",
)
@progress_option
@report_option
def run_cmd(
    recipe: str,
    workdir: str,
    resume: bool,
    force: bool,
    dry_run: bool,
    plots: str | None,
    progress: bool,
) -> dict:
    """Run a recipe of steps (merge, prune, quantize, distill, eval...) as one batch job."""
    from weightsmith.cli.recipe_steps import translate_steps
    from weightsmith.pipeline import run_recipe
    from weightsmith.pipeline.runner import RecipeFailed

    try:
        report = run_recipe(
            recipe, workdir, resume=resume, force=force, dry_run=dry_run, progress=progress,
            plots=plots, echo=lambda m: click.echo(m, err=True),
            translate=functools.partial(translate_steps, cli),  # this process has the commands
        )  # fmt: skip
    except RecipeFailed as e:
        click.get_current_context().meta["weightsmith_report"] = e.report
        raise
    done = sum(1 for s in report["steps"] if not s.get("skipped"))
    click.echo(
        f"{'validated' if dry_run else 'ran'} {done} step(s), "
        f"{len(report['steps']) - done} up to date, in {report['wall_s']:.1f} s -> {workdir}"
    )
    return report


@cli.command("translate-steps", hidden=True)
def translate_steps_cmd() -> None:
    """Recipe steps (JSON on stdin) -> their checked command lines (JSON on stdout); the
    pipeline's way to use the commands' options without importing this package."""
    from dataclasses import asdict

    from weightsmith.cli.recipe_steps import translate_steps
    from weightsmith.pipeline.commands import requests_from_json

    answers = translate_steps(cli, requests_from_json(sys.stdin.read()))
    click.echo(json.dumps([asdict(a) for a in answers]))


__all__ = ["cli", "compress_cli", "distill_cli", "eval_cli", "merge_cli"]
