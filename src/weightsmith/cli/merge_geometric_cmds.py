"""``merge`` commands for mergekit 0.1.5's geometric and selective methods: ``model-stock``,
``nuslerp``, ``multislerp``, ``karcher``, ``arcee-fusion`` and ``ram``.

Each builds the same :class:`~weightsmith.merge.MergeRecipe` a mergekit YAML would give
(``merge run`` takes that YAML) with the method's parameter names and defaults.
"""

from __future__ import annotations

from typing import Any

import click

from weightsmith.cli.common import FINITE_FLOAT, MODEL
from weightsmith.cli.groups import merge_cli
from weightsmith.cli.merge_cmds import (
    base_option,
    common,
    merge_options,
    model_entries,
    run_recipe,
    tokenizer_option,
    weights_option,
)
from weightsmith.errors import ConfigError


def checked(method: str, name: str, value: Any, option: str) -> Any:
    """``value`` checked against ``method``'s declaration of ``name`` (error names ``option``)."""
    from weightsmith.merge.methods import get_method

    get_method(method).declared(name).check(value, option)
    return value


def plain_models(models: tuple[str, ...]) -> tuple:
    from weightsmith.merge import ModelInput

    return tuple(ModelInput(m) for m in models)


@merge_cli.command("model-stock")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@base_option
@click.option("--filter-wise", is_flag=True, help="One ratio per row instead of per tensor.")
@tokenizer_option
@merge_options
@common
def model_stock_cmd(models, base, filter_wise, tokenizer_source, out, opts) -> dict:
    """Model Stock: move from the base towards the models' mean by a ratio from the angles
    between their task vectors (mergekit 'model_stock'; 2+ models)."""
    from weightsmith.merge import MergeRecipe

    if len(models) < 2:
        raise ConfigError("model-stock needs at least two models besides --base")
    recipe = MergeRecipe(
        "model_stock",
        models=plain_models(models),
        base_model=base,
        parameters={"filter_wise": filter_wise},
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("nuslerp")
@click.argument("a", type=MODEL)
@click.argument("b", type=MODEL)
@click.option("--base", default=None, type=MODEL, help="Interpolate task vectors.")
@weights_option
@click.option("--row-wise", is_flag=True, help="Vectors along dim 0 (nuslerp_row_wise).")
@click.option(
    "--flatten/--no-flatten",
    default=True,
    show_default=True,
    help="The whole tensor is one vector (nuslerp_flatten); else rows.",
)
@tokenizer_option
@merge_options
@common
def nuslerp_cmd(a, b, base, weights, row_wise, flatten, tokenizer_source, out, opts) -> dict:
    """SLERP of A and B at t = w_B / (w_A + w_B), of their task vectors with --base
    (mergekit 'nuslerp')."""
    from weightsmith.merge import MergeRecipe

    recipe = MergeRecipe(
        "nuslerp",
        models=model_entries((a, b), weights),
        base_model=base,
        parameters={"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten},
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("multislerp")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@click.option("--base", default=None, type=MODEL, help="Interpolate task vectors.")
@weights_option
@click.option(
    "--normalize-weights/--no-normalize-weights",
    default=True,
    show_default=True,
    help="Divide the weights by their sum.",
)
@click.option("--eps", type=FINITE_FLOAT, default=1e-8, show_default=True, help="Added to norms.")
@tokenizer_option
@merge_options
@common
def multislerp_cmd(
    models, base, weights, normalize_weights, eps, tokenizer_source, out, opts
) -> dict:
    """Barycentric interpolation of MODELS on a hypersphere (mergekit 'multislerp')."""
    from weightsmith.merge import MergeRecipe

    recipe = MergeRecipe(
        "multislerp",
        models=model_entries(models, weights),
        base_model=base,
        parameters={
            "normalize_weights": normalize_weights,
            "eps": checked("multislerp", "eps", eps, "--eps"),
        },
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("karcher")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@click.option("--max-iter", type=int, default=10, show_default=True, help="Most iterations.")
@click.option("--tol", type=FINITE_FLOAT, default=1e-5, show_default=True, help="Tolerance.")
@tokenizer_option
@merge_options
@common
def karcher_cmd(models, max_iter, tol, tokenizer_source, out, opts) -> dict:
    """Karcher mean of MODELS on the unit sphere, scaled by their mean norm (mergekit
    'karcher')."""
    from weightsmith.merge import MergeRecipe

    if len(models) < 2:
        raise ConfigError("karcher needs at least two models")
    recipe = MergeRecipe(
        "karcher",
        models=plain_models(models),
        parameters={
            "max_iter": checked("karcher", "max_iter", max_iter, "--max-iter"),
            "tol": checked("karcher", "tol", tol, "--tol"),
        },
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("arcee-fusion")
@click.argument("base", type=MODEL)
@click.argument("model", type=MODEL)
@tokenizer_option
@merge_options
@common
def arcee_fusion_cmd(base, model, tokenizer_source, out, opts) -> dict:
    """Keep MODEL's changes to BASE whose importance (|δ| times the rows' KL divergence) is an
    outlier: above median + 1.5 IQR (mergekit 'arcee_fusion')."""
    from weightsmith.merge import MergeRecipe

    recipe = MergeRecipe(
        "arcee_fusion",
        models=plain_models((base, model)),
        base_model=base,
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("ram")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@base_option
@click.option(
    "--epsilon",
    type=FINITE_FLOAT,
    default=1e-5,
    show_default=True,
    help="A task-vector entry counts when |δ| > epsilon.",
)
@tokenizer_option
@merge_options
@common
def ram_cmd(models, base, epsilon, tokenizer_source, out, opts) -> dict:
    """Reinforced Agent Merging: entries one model changed take its change, entries several
    changed take their mean (mergekit 'ram')."""
    from weightsmith.merge import MergeRecipe

    recipe = MergeRecipe(
        "ram",
        models=plain_models(models),
        base_model=base,
        parameters={"epsilon": checked("ram", "epsilon", epsilon, "--epsilon")},
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("ramplus-tl")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@base_option
@click.option("--r", "r", type=FINITE_FLOAT, default=0.1, show_default=True,
              help="Strength of the boost of each model's unique entries.")  # fmt: skip
@click.option("--alpha", type=FINITE_FLOAT, default=0.2, show_default=True,
              help="Upper clamp of the shared/unique ratio rho.")  # fmt: skip
@click.option("--epsilon", type=FINITE_FLOAT, default=1e-5, show_default=True,
              help="A task-vector entry counts when |δ| > epsilon.")  # fmt: skip
@tokenizer_option
@merge_options
@common
def ramplus_tl_cmd(models, base, r, alpha, epsilon, tokenizer_source, out, opts) -> dict:
    """RAM+ (tensor-local): RAM with each model's unique entries scaled by
    1 + r·clamp(shared/unique, 0, alpha), counted over the tensor (mergekit 'ramplus_tl')."""
    from weightsmith.merge import MergeRecipe

    recipe = MergeRecipe(
        "ramplus_tl",
        models=plain_models(models),
        base_model=base,
        parameters={
            "r": checked("ramplus_tl", "r", r, "--r"),
            "alpha": checked("ramplus_tl", "alpha", alpha, "--alpha"),
            "epsilon": checked("ramplus_tl", "epsilon", epsilon, "--epsilon"),
        },
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)
