"""``merge extract-lora``: a PEFT LoRA adapter from a fine-tune and its base
(mergekit-extract-lora's options); ``merge lora``: fold an adapter into its base."""

from __future__ import annotations

import click

from weightsmith.cli.common import (
    FINITE_FLOAT,
    MODEL,
    MODEL_OR_FOLD,
    force_option,
    progress_option,
    report_option,
)
from weightsmith.cli.fold_options import lora_fold_options
from weightsmith.cli.groups import merge_cli
from weightsmith.cli.merge_cmds import common, merge_options, parse_number
from weightsmith.errors import ConfigError
from weightsmith.io.sizes import format_size, parse_size


@merge_cli.command("extract-lora")
@click.argument("base", type=MODEL_OR_FOLD)
@click.argument("finetuned", type=MODEL_OR_FOLD)
@click.option("-o", "--out", required=True, type=click.Path(), help="Adapter folder to write.")
@click.option(
    "--rank",
    "--max-rank",
    "rank",
    type=int,
    default=128,
    show_default=True,
    help="Maximum rank of each module's decomposition.",
)
@click.option(
    "--sv-epsilon",
    type=FINITE_FLOAT,
    default=0.0,
    show_default=True,
    help="Also drop singular values <= this (per-module ranks then differ).",
)
@click.option(
    "--distribute-scale/--no-distribute-scale",
    default=True,
    show_default=True,
    help="Split the singular values between A and B (√S each), else all in A.",
)
@click.option(
    "--embed-lora/--no-embed-lora",
    default=False,
    show_default=True,
    help="Decompose the embeddings too (default: save them at full rank).",
)
@click.option(
    "--save-module",
    "--modules-to-save",
    "modules_to_save",
    multiple=True,
    help="Save this module (full name or last component, e.g. lm_head) at full rank.",
)
@click.option(
    "-e", "--exclude-regex", "exclude_regexes", multiple=True, help="Skip modules matching this."
)
@click.option(
    "-i",
    "--include-regex",
    "include_regexes",
    multiple=True,
    help="Only decompose modules matching one of these.",
)
@click.option(
    "--skip-undecomposable",
    is_flag=True,
    help="Leave out modules that are not Linear/Embedding (norms) instead of saving them.",
)
@click.option("--device", default="cpu", show_default=True, help="Where the SVDs run.")
@lora_fold_options
@force_option
@progress_option
@report_option
def extract_lora_cmd(
    base, finetuned, out, rank, sv_epsilon, distribute_scale, embed_lora, modules_to_save,
    exclude_regexes, include_regexes, skip_undecomposable, device, folds, force, progress,
):  # fmt: skip
    """Extract the LoRA adapter that turns BASE into FINETUNED: truncated SVD of each
    Linear delta (FINETUNED - BASE), written as a PEFT adapter (mergekit-extract-lora).

    BASE or FINETUNED written MODEL+ADAPTER is MODEL with that LoRA adapter folded in: e.g.
    BASE BASE+ADAPTER --rank 8 re-extracts an adapter at rank 8."""
    from weightsmith.merge.extract_lora import ExtractLoraConfig, extract_lora

    cfg = ExtractLoraConfig(
        max_rank=rank,
        sv_epsilon=sv_epsilon,
        distribute_scale=distribute_scale,
        embed_lora=embed_lora,
        modules_to_save=tuple(modules_to_save),
        include_regexes=tuple(include_regexes),
        exclude_regexes=tuple(exclude_regexes),
        skip_undecomposable=skip_undecomposable,
    )
    r = extract_lora(
        base, finetuned, out, cfg, device=device, force=force, progress=progress, **folds
    )
    dropped = f", {len(r.dropped_modules)} below --sv-epsilon" if r.dropped_modules else ""
    click.echo(
        f"extracted LoRA: {r.lora_modules} modules (rank <= {r.max_rank}, "
        f"{100 * r.retained_energy:.2f}% of the delta energy), {r.saved_modules} saved at full "
        f"rank{dropped}, {format_size(r.total_size)} in {r.wall_s:.1f} s -> {r.out}"
    )
    from dataclasses import asdict

    return {"method": "extract-lora", "output": r.out, "result": asdict(r)}


@merge_cli.command("moe")
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory.")
@click.option(
    "--seed",
    "--random-seed",
    "seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of random gates and expert noise (mergekit's --random-seed: same numbers).",
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Largest shard file to write (e.g. 2GB, 500MB, 4GiB).",
)
@click.option(
    "--i-understand-this-is-not-useful-without-training",
    "allow_all_same",
    is_flag=True,
    help="Allow every expert to be the same model (mergekit's flag).",
)
@force_option
@progress_option
@report_option
def moe_cmd(config_path, out, seed, max_shard_size, allow_all_same, force, progress):
    """Build a Mixtral (or, with one shared expert, Qwen2-MoE) mixture of experts from dense
    models (mergekit-moe YAML: base_model, experts, shared_experts, gate_mode
    hidden|cheap_embed|random|uniform_random, dtype, experts_per_token, architecture)."""
    from pathlib import Path

    from weightsmith.io.sizes import parse_size
    from weightsmith.merge.moe import load_moe_config
    from weightsmith.merge.moe_build import build_moe

    cfg = load_moe_config(config_path, allow_all_same)
    result = build_moe(
        cfg,
        out,
        seed=seed,
        config_text=Path(config_path).read_text(encoding="utf-8"),
        max_shard_size=parse_size(max_shard_size),
        force=force,
        progress=progress,
    )
    click.echo(
        f"built {'Qwen2-MoE' if cfg.shared_experts else 'Mixtral'} MoE: {len(cfg.experts)} experts, {cfg.experts_per_token} per token, "
        f"{cfg.gate_mode} gates, {result.tensors} tensors ({format_size(result.total_size)}) "
        f"in {result.wall_s:.1f} s -> {result.out}"
    )
    return {"method": "moe", "output": result.out, "result": result.to_dict()}


@merge_cli.command("lora")
@click.argument("base", type=MODEL)
@click.argument("adapter", type=click.Path())
@click.option(
    "--scale",
    type=FINITE_FLOAT,
    default=None,
    help="Override the trained scale lora_alpha/r (e.g. lower it to soften the adapter).",
)
@merge_options
@common
def lora_cmd(base, adapter, scale, out, opts) -> dict:
    """Fold the PEFT LoRA adapter in ADAPTER into BASE (equals peft's merge_and_unload)."""
    from weightsmith.merge.lora import merge_lora

    if opts["allow_pickle"] or opts["compute_dtype"] or opts["chat_template"]:
        raise ConfigError(
            "merge lora reads safetensors only, computes in float32 and keeps the tokenizer"
        )
    result = merge_lora(
        base,
        adapter,
        out,
        scale=None if scale is None else parse_number(scale, "--scale"),
        dtype=opts["dtype"],
        device=opts["device"],
        max_shard_size=parse_size(opts["max_shard_size"]),
        force=opts["force"],
        progress=opts["progress"],
    )
    click.echo(
        f"merged LoRA ({result.extra['lora_modules']} tensors) into {result.tensors} tensors "
        f"({format_size(result.total_size)}) in {result.wall_s:.1f} s, peak RSS "
        f"{format_size(result.peak_rss)} -> {result.out}"
    )
    return {"method": "lora", "output": result.out, "result": result.to_dict()}
