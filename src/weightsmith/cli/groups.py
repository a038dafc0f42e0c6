"""The command groups: ``weightsmith`` and its shortcuts ``compress``, ``merge``, ``distill``.

Subsystem command modules import their group from here and add commands to it; each group
imports its modules only when one of its commands is looked up (:class:`WsGroup`).
"""

from __future__ import annotations

import click

from weightsmith.cli.common import WsGroup


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--version`` as click's version option prints it, reading the installed version (a
    package-metadata scan) only when asked."""
    if not value or ctx.resilient_parsing:
        return
    from weightsmith import __version__

    click.echo(f"weightsmith, version {__version__}")
    ctx.exit()


@click.group(cls=WsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
    help="Show the version and exit.",
)  # fmt: skip
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
    from weightsmith.cli.distill_train import run_bare

    run_bare(ctx, options)


def _distill_params() -> None:
    """The group runs the bare command itself when no subcommand is given."""
    from weightsmith.cli.distill_train import legacy_command

    distill_cli.params.extend(legacy_command.params)


@click.group("eval", cls=WsGroup)
def eval_cli() -> None:
    """Measure a model: perplexity, divergence from a reference, task accuracy."""


cli.add_command(compress_cli, "compress")
cli.add_command(merge_cli, "merge")
cli.add_command(distill_cli, "distill")
cli.add_command(eval_cli, "eval")

compress_cli.lazy_modules = ("weightsmith.cli.compress_cmds", "weightsmith.cli.prune_cmds",
                             "weightsmith.cli.qat_cmds")  # fmt: skip
merge_cli.lazy_modules = ("weightsmith.cli.merge_cmds", "weightsmith.cli.merge_extra_cmds",
                          "weightsmith.cli.merge_geometric_cmds",
                          "weightsmith.cli.merge_sparse_cmds")  # fmt: skip
distill_cli.lazy_modules = ("weightsmith.cli.distill_cmds",)
distill_cli.lazy_setup = _distill_params
eval_cli.lazy_modules = ("weightsmith.cli.accuracy_cmds", "weightsmith.cli.eval_cmds",
                         "weightsmith.cli.lmeval_cmds")  # fmt: skip
