"""``merge`` commands: each builds a :class:`~weightsmith.merge.MergeRecipe` (mergekit's
schema; ``merge run`` reads it from YAML) and calls :func:`weightsmith.merge.merge`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from weightsmith.cli.common import (
    FINITE_FLOAT,
    MODEL,
    allow_pickle_option,
    download_option,
    force_option,
    max_shard_size_option,
    progress_option,
    report_option,
)
from weightsmith.cli.fold_options import lora_fold_options
from weightsmith.cli.groups import merge_cli
from weightsmith.errors import ConfigError
from weightsmith.io.sizes import format_size, parse_size


def merge_options(fn: Callable) -> Callable:
    """Output, dtype, device, sharding, progress and report options shared by every command."""
    options = [
        click.option("-o", "--out", required=True, type=click.Path(), help="Output directory."),
        click.option(
            "--dtype",
            type=click.Choice(["bfloat16", "float16", "float32"]),
            default=None,
            help="Output dtype of floating tensors (default: the base/first model's).",
        ),
        click.option(
            "--compute-dtype",
            type=click.Choice(["bfloat16", "float16", "float32"]),
            default=None,
            help="Dtype of the arithmetic (default: mergekit's, the inputs' dtype; float32: "
            "weightsmith's exact float32 arithmetic).",
        ),
        click.option(
            "--device",
            default="cpu",
            show_default=True,
            help="cpu, cuda, cuda:N, or auto (CUDA when present).",
        ),
        click.option(
            "--chat-template",
            default=None,
            help="Chat template of the output tokenizer: auto (the inputs' most common), "
            "chatml, llama3, or a literal Jinja template (mergekit's chat_template).",
        ),
        max_shard_size_option,
        force_option,
        allow_pickle_option,
        progress_option,
        report_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def tokenizer_option(fn: Callable) -> Callable:
    return click.option(
        "--tokenizer-source",
        default=None,
        help="Merge embedding and lm_head rows by token: base (the base model's "
        "vocabulary), union (every model's tokens) or a model (its tokenizer); the merged "
        "tokenizer is written (mergekit's tokenizer_source).",
    )(fn)


def base_option(fn: Callable) -> Callable:
    return click.option(
        "--base",
        required=True,
        type=MODEL,
        help="Base model (task vectors are differences from it).",
    )(fn)


def weights_option(fn: Callable) -> Callable:
    return click.option(
        "--weights", default=None, help="Comma-separated weight per model (default: 1 each)."
    )(fn)


def lambda_option(fn: Callable) -> Callable:
    return click.option(
        "--lambda",
        "lam",
        type=FINITE_FLOAT,
        default=1.0,
        show_default=True,
        help="Scale of the mixed task vector.",
    )(fn)


# ---------------------------------------------------------------------- value parsing
def parse_number(text: str | float, what: str) -> float:
    """``text`` as a finite number (the one check of merge/params.py), else a ConfigError."""
    from weightsmith.merge.params import finite

    try:
        return finite(float(text), what)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a number") from None


def parse_scalar_or_gradient(text: str, what: str) -> float | list[float]:
    parts = [p.strip() for p in text.split(",")]
    values = [parse_number(p, what) for p in parts]
    return values[0] if len(values) == 1 else values


def parse_setting(values: tuple[str, ...], what: str, method: str = "", name: str = "") -> Any:
    """``0.5`` | ``0,0.5,1`` (gradient over depth) | ``self_attn=0.3`` (repeatable filters),
    checked against ``method``'s declaration of parameter ``name`` when given."""
    if not values:
        return None
    if method:
        from weightsmith.merge.methods import get_method
        from weightsmith.merge.params import check_declared

        setting = parse_setting(values, what)
        check_declared(get_method(method).declared(name), setting, what)
        return setting
    conditions: list[dict] = []
    default = None
    for v in values:
        if "=" in v:
            flt, _, val = v.partition("=")
            conditions.append({"filter": flt.strip(), "value": parse_scalar_or_gradient(val, what)})
        elif default is not None:
            raise ConfigError(f"{what}: more than one value without a filter ({values})")
        else:
            default = parse_scalar_or_gradient(v, what)
    if not conditions:
        return default
    if default is not None:
        conditions.append({"value": default})
    return conditions


def model_entries(models: tuple[str, ...], weights: str | None, extra: dict | None = None):
    from weightsmith.merge import ModelInput

    if weights is None:
        ws = [1.0] * len(models)
    else:
        ws = [parse_number(w, "--weights") for w in weights.split(",")]
        if len(ws) != len(models):
            raise ConfigError(f"--weights has {len(ws)} values for {len(models)} models")
    return tuple(
        ModelInput(m, {"weight": w, **(extra or {})}) for m, w in zip(models, ws, strict=True)
    )


def run_recipe(recipe, out: str, **opts: Any) -> dict:
    from dataclasses import replace

    from weightsmith.merge import merge

    if opts.get("chat_template"):
        recipe = replace(recipe, chat_template=opts["chat_template"]).validate()

    result = merge(
        recipe,
        out,
        dtype=opts["dtype"],
        device=opts["device"],
        max_shard_size=parse_size(opts["max_shard_size"]),
        force=opts["force"],
        progress=opts["progress"],
        allow_pickle=opts["allow_pickle"],
        models_dir=opts.get("models_dir"),
        final_from=opts.get("final_from"),
        compute_dtype=opts["compute_dtype"],
        lora_merge_cache=opts.get("lora_merge_cache"),
        lora_merge_dtype=opts.get("lora_merge_dtype"),
    )
    click.echo(
        f"merged ({recipe.merge_method}) {result.tensors} tensors "
        f"({format_size(result.total_size)}) in {result.wall_s:.1f} s, peak RSS "
        f"{format_size(result.peak_rss)} -> {result.out}"
    )
    return {"method": recipe.merge_method, "output": result.out, "result": result.to_dict()}


def common(fn: Callable) -> Callable:
    """Pass the shared options through as ``opts``."""

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        keys = "dtype compute_dtype device chat_template max_shard_size force progress allow_pickle"
        opts = {k: kwargs.pop(k) for k in keys.split()}
        return fn(opts=opts, **kwargs)

    return wrapper


# ---------------------------------------------------------------------- commands
@merge_cli.command("linear")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@weights_option
@click.option(
    "--normalize/--no-normalize",
    default=True,
    show_default=True,
    help="Divide by the sum of the weights.",
)
@tokenizer_option
@merge_options
@common
def linear_cmd(models, weights, normalize, tokenizer_source, out, opts) -> dict:
    """Weighted average of MODELS (mergekit 'linear')."""
    from weightsmith.merge import MergeRecipe

    if len(models) < 2:
        raise ConfigError("linear needs at least two models")
    recipe = MergeRecipe(
        "linear",
        models=model_entries(models, weights),
        parameters={"normalize": normalize},
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("slerp")
@click.argument("a", type=MODEL)
@click.argument("b", type=MODEL)
@click.option(
    "--t",
    "t",
    multiple=True,
    required=True,
    help="0 gives A, 1 gives B. A gradient over depth (0,0.5,1) or per-filter values "
    "(--t self_attn=0.3 --t mlp=0.7 --t 0.5); repeatable.",
)
@tokenizer_option
@merge_options
@common
def slerp_cmd(a, b, t, tokenizer_source, out, opts) -> dict:
    """Spherical interpolation from A (the base) towards B (mergekit 'slerp')."""
    from weightsmith.merge import MergeRecipe, ModelInput

    recipe = MergeRecipe(
        "slerp",
        models=(ModelInput(a), ModelInput(b)),
        base_model=a,
        parameters={"t": parse_setting(t, "--t", "slerp", "t")},
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("task-arithmetic")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@base_option
@weights_option
@lambda_option
@click.option(
    "--normalize/--no-normalize",
    default=False,
    show_default=True,
    help="Divide the summed task vectors by the sum of the weights.",
)
@tokenizer_option
@merge_options
@common
def task_arithmetic_cmd(models, base, weights, lam, normalize, tokenizer_source, out, opts):
    """base + λ·Σ wᵢ (MODELᵢ − base) (mergekit 'task_arithmetic')."""
    from weightsmith.merge import MergeRecipe

    recipe = MergeRecipe(
        "task_arithmetic",
        models=model_entries(models, weights),
        base_model=base,
        parameters={"lambda": parse_number(lam, "--lambda"), "normalize": normalize},
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("ties")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@base_option
@click.option(
    "--density",
    multiple=True,
    required=True,
    help="Fraction of each task vector kept by magnitude (also a gradient or "
    "filter=value, like slerp --t).",
)
@weights_option
@lambda_option
@click.option(
    "--normalize/--no-normalize",
    default=True,
    show_default=True,
    help="Divide by the sum of the agreeing weights (disjoint mean).",
)
@tokenizer_option
@merge_options
@common
def ties_cmd(models, base, density, weights, lam, normalize, tokenizer_source, out, opts):
    """TIES: trim task vectors, elect signs, average what agrees (mergekit 'ties')."""
    from weightsmith.merge import MergeRecipe

    recipe = MergeRecipe(
        "ties",
        models=model_entries(models, weights),
        base_model=base,
        parameters={
            "density": parse_setting(density, "--density", "ties", "density"),
            "normalize": normalize,
            "lambda": parse_number(lam, "--lambda"),
        },
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("dare")
@click.argument("models", nargs=-1, required=True, type=MODEL)
@base_option
@click.option(
    "--density",
    multiple=True,
    required=True,
    help="Probability of keeping each task-vector entry (also a gradient or filter=value).",
)
@click.option("--ties", "use_ties", is_flag=True, help="Add TIES sign election (dare_ties).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the drop masks.")
@weights_option
@lambda_option
@click.option(
    "--normalize/--no-normalize",
    default=False,
    show_default=True,
    help="Divide by the sum of the (agreeing) weights.",
)
@click.option(
    "--rescale/--no-rescale",
    default=True,
    show_default=True,
    help="Rescale kept entries by 1/density.",
)
@tokenizer_option
@merge_options
@common
def dare_cmd(
    models, base, density, use_ties, seed, weights, lam, normalize, rescale, tokenizer_source,
    out, opts,
):  # fmt: skip
    """DARE: random drop + rescale of task vectors (mergekit 'dare_linear' / 'dare_ties')."""
    from weightsmith.merge import MergeRecipe

    recipe = MergeRecipe(
        "dare_ties" if use_ties else "dare_linear",
        models=model_entries(models, weights),
        base_model=base,
        parameters={
            "density": parse_setting(density, "--density", "dare_linear", "density"),
            "normalize": normalize,
            "rescale": rescale,
            "lambda": parse_number(lam, "--lambda"),
            "seed": seed,
        },
        tokenizer_source=tokenizer_source,
    )
    return run_recipe(recipe, out, **opts)


@merge_cli.command("passthrough")
@click.option(
    "--slice",
    "slices",
    multiple=True,
    required=True,
    help="MODEL:START:END, layers [START, END) of MODEL; repeat in output order.",
)
@click.option(
    "--final-from",
    default=None,
    type=MODEL,
    help="Model whose final norm and lm_head are used (default: the first slice's).",
)
@merge_options
@common
def passthrough_cmd(slices, final_from, out, opts) -> dict:
    """Stack layer ranges of models into a new model (renumbers layers, updates config)."""
    from weightsmith.merge import InputSlice, MergeRecipe, OutputSlice

    parsed = []
    for s in slices:
        parts = s.rsplit(":", 2)
        if len(parts) != 3:
            raise ConfigError(f"--slice {s!r}: expected MODEL:START:END")
        model, start, end = parts
        try:
            rng = (int(start), int(end))
        except ValueError:
            raise ConfigError(f"--slice {s!r}: START and END must be integers") from None
        parsed.append(OutputSlice((InputSlice(model, rng),)))
    recipe = MergeRecipe("passthrough", slices=tuple(parsed))
    first = parsed[0].sources[0].model
    return run_recipe(recipe, out, final_from=final_from or first, **opts)


@merge_cli.command("run")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path())
@download_option
@click.option(
    "--models-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Folder that relative model names in the recipe are looked up in first.",
)
@lora_fold_options
@merge_options
@common
def run_cmd(recipe_path, models_dir, folds, out, opts) -> dict:
    """Run a mergekit YAML recipe (merge_method, models/slices, parameters, dtype, ...).

    A model written MODEL+ADAPTER is MODEL with the PEFT LoRA adapter ADAPTER folded in."""
    from weightsmith.merge import load_recipe

    recipe = load_recipe(recipe_path)
    return {
        "recipe": recipe_path,
        **run_recipe(recipe, out, models_dir=models_dir, **folds, **opts),
    }
