"""``merge`` commands for mergekit's masked task-vector methods and NearSwap: ``breadcrumbs``
(``--ties``), ``della`` (``--linear``), ``sce`` and ``nearswap``.

Like :mod:`weightsmith.cli.merge_cmds`, each builds a :class:`~weightsmith.merge.MergeRecipe`
and runs it; options not given keep the method's mergekit default.
"""

from __future__ import annotations

import click

from weightsmith.cli.common import MODEL
from weightsmith.cli.groups import merge_cli
from weightsmith.cli.merge_cmds import (
    base_option,
    common,
    lambda_option,
    merge_options,
    model_entries,
    parse_number,
    parse_setting,
    run_recipe,
    tokenizer_option,
    weights_option,
)


def _density_option(help_text: str):
    return click.option(
        "--density",
        multiple=True,
        required=True,
        help=f"{help_text} (also a gradient or filter=value, like slerp --t).",
    )


def _normalize_option(fn):
    return click.option(
        "--normalize/--no-normalize",
        default=None,
        help="Divide by the sum of the (agreeing) weights (default: the method's).",
    )(fn)


def _drop_none(params: dict) -> dict:
    return {k: v for k, v in params.items() if v is not None}


@merge_cli.command("breadcrumbs")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@base_option
@_density_option("Fraction of each task vector's entries kept")
@click.option(
    "--gamma",
    multiple=True,
    help="Fraction of the largest-magnitude entries dropped as outliers [default: 0.01].",
)
@click.option("--ties", "use_ties", is_flag=True, help="Add TIES sign election (breadcrumbs_ties).")
@weights_option
@lambda_option
@_normalize_option
@click.option(
    "--rescale/--no-rescale",
    default=False,
    show_default=True,
    help="Rescale the kept entries to the task vector's L1 norm.",
)
@tokenizer_option
@merge_options
@common
def breadcrumbs_cmd(
    models, base, density, gamma, use_ties, weights, lam, normalize, rescale, tokenizer_source,
    out, opts,
):  # fmt: skip
    """Breadcrumbs: drop each task vector's outliers and smallest entries (mergekit
    'breadcrumbs' / 'breadcrumbs_ties')."""
    from weightsmith.merge import MergeRecipe

    method = "breadcrumbs_ties" if use_ties else "breadcrumbs"
    recipe = MergeRecipe(
        method,
        models=model_entries(models, weights),
        base_model=base,
        parameters=_drop_none(
            {
                "density": parse_setting(density, "--density", method, "density"),
                "gamma": parse_setting(gamma, "--gamma", method, "gamma"),
                "normalize": normalize,
                "rescale": rescale,
                "lambda": parse_number(lam, "--lambda"),
            }
        ),
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("della")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@base_option
@_density_option("Mean probability of keeping each task-vector entry")
@click.option(
    "--epsilon",
    multiple=True,
    help="Keep probabilities span density ± epsilon by magnitude rank [default: 0.15].",
)
@click.option("--linear", "linear", is_flag=True, help="No sign election (della_linear).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the keep draws.")
@weights_option
@lambda_option
@_normalize_option
@click.option(
    "--rescale/--no-rescale",
    default=True,
    show_default=True,
    help="Rescale the kept entries to the task vector's L1 norm.",
)
@tokenizer_option
@merge_options
@common
def della_cmd(
    models, base, density, epsilon, linear, seed, weights, lam, normalize, rescale,
    tokenizer_source, out, opts,
):  # fmt: skip
    """DELLA: drop task-vector entries at random, small ones more often (mergekit 'della' /
    'della_linear')."""
    from weightsmith.merge import MergeRecipe

    method = "della_linear" if linear else "della"
    recipe = MergeRecipe(
        method,
        models=model_entries(models, weights),
        base_model=base,
        parameters=_drop_none(
            {
                "density": parse_setting(density, "--density", method, "density"),
                "epsilon": parse_setting(epsilon, "--epsilon", method, "epsilon"),
                "normalize": normalize,
                "rescale": rescale,
                "lambda": parse_number(lam, "--lambda"),
                "seed": seed,
            }
        ),
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("sce")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@base_option
@click.option(
    "--select-topk",
    multiple=True,
    help="Fraction of the entries kept, by variance across the models [default: 1].",
)
@tokenizer_option
@merge_options
@common
def sce_cmd(models, base, select_topk, tokenizer_source, out, opts) -> dict:
    """SCE: select high-variance entries, weight models by their task vectors' energy, erase
    sign conflicts (mergekit 'sce')."""
    from weightsmith.merge import MergeRecipe, ModelInput

    recipe = MergeRecipe(
        "sce",
        models=tuple(ModelInput(m) for m in models),
        base_model=base,
        parameters=_drop_none(
            {"select_topk": parse_setting(select_topk, "--select-topk", "sce", "select_topk")}
        ),
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("nearswap")
@click.argument("a", type=MODEL)
@click.argument("b", type=MODEL)
@click.option(
    "--t",
    "t",
    multiple=True,
    required=True,
    help="Entries of B closer than t to A's are taken (A is the base); also a gradient or "
    "filter=value.",
)
@tokenizer_option
@merge_options
@common
def nearswap_cmd(a, b, t, tokenizer_source, out, opts) -> dict:
    """NearSwap: move A (the base) towards B where they are close (mergekit 'nearswap')."""
    from weightsmith.merge import MergeRecipe, ModelInput

    recipe = MergeRecipe(
        "nearswap",
        models=(ModelInput(b),),
        base_model=a,
        parameters={"t": parse_setting(t, "--t", "nearswap", "t")},
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)
