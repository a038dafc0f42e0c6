"""The command groups: ``weightsmith`` and its shortcuts ``compress``, ``merge``, ``distill``.

Subsystem command modules import their group from here and add commands to it.
"""

from __future__ import annotations

import click

from weightsmith import __version__
from weightsmith.cli.common import WsGroup
from weightsmith.cli.distill_train import legacy_command, run_bare


@click.group(cls=WsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weightsmith")
def cli() -> None:
    """weightsmith: make language models smaller (compress), combine them (merge) and teach
    small ones from big ones (distill), streaming one tensor or layer at a time."""


@click.group(cls=WsGroup)
def compress_cli() -> None:
    """Quantize and prune checkpoints."""


@click.group(cls=WsGroup)
def merge_cli() -> None:
    """Merge checkpoints (linear, SLERP, task arithmetic, TIES, DARE, passthrough, LoRA)."""


@click.group(cls=WsGroup, invoke_without_command=True, no_args_is_help=True)
@click.pass_context
def distill_cli(ctx: click.Context, **options: object) -> None:
    """Train a small student from a teacher: one subcommand per method (kd, seqkd, sft, dpo,
    step-by-step) and the data commands (cache, generate, feedback, rationales).

    Without a subcommand, `distill --teacher T --student S --data D -o OUT` runs `distill kd`
    with the options below."""
    run_bare(ctx, options)


# The group runs the bare command itself when no subcommand is given.
distill_cli.params.extend(legacy_command.params)


@click.group("eval", cls=WsGroup)
def eval_cli() -> None:
    """Measure a model: perplexity, divergence from a reference, task accuracy."""


cli.add_command(compress_cli, "compress")
cli.add_command(merge_cli, "merge")
cli.add_command(distill_cli, "distill")
cli.add_command(eval_cli, "eval")
