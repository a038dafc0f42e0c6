"""``compress prune``: unstructured / N:M sparsity and structured (layer, MLP-channel) pruning."""

from __future__ import annotations

import click

from weightsmith.cli.common import (
    FINITE_FLOAT,
    MODEL,
    calibration_options,
    force_option,
    max_shard_size_option,
    moe_options,
    note_builtin_calibration,
    progress_option,
    report_option,
)
from weightsmith.cli.dtype_options import CALIB_DTYPE_HELP, dtype_option
from weightsmith.cli.groups import compress_cli
from weightsmith.compress.prune import METHODS, PruneConfig, parse_pattern, prune_checkpoint
from weightsmith.compress.prune.registry import NM_SELECT, SPARSEGPT_DAMP
from weightsmith.errors import ConfigError
from weightsmith.io.sizes import format_size, parse_size


def _layers(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            f"--layers {text!r}: expected comma-separated layer indices, e.g. 12,13"
        ) from None


@compress_cli.command("prune")
@click.argument("model", type=MODEL)
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory.")
@click.option(
    "--method",
    type=click.Choice(sorted(METHODS)),
    default="wanda",
    show_default=True,
    help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()),
)
@click.option(
    "--sparsity",
    type=FINITE_FLOAT,
    default=None,
    help="magnitude/wanda/sparsegpt: fraction of weights zeroed (default 0.5).",
)
@click.option(
    "--pattern",
    default=None,
    help="magnitude/wanda/sparsegpt: N:M sparsity, e.g. 2:4 (N of every M inputs zero).",
)
@click.option(
    "--ignore",
    multiple=True,
    help="Keep this Linear dense (name, dotted suffix, or re:REGEX); repeatable. Embeddings and lm_head are never pruned.",
)
@click.option(
    "--drop",
    type=int,
    default=None,
    help="layers: number of decoder layers to drop (lowest 1 - cos).",
)
@click.option(
    "--layers",
    "layers_text",
    default=None,
    help="layers: drop exactly these decoder layers, e.g. 12,13.",
)
@click.option(
    "--mlp-ratio",
    type=FINITE_FLOAT,
    default=None,
    help="channels: fraction of MLP channels kept, e.g. 0.75.",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    help="experts: MoE experts kept per layer (the ones its router uses most).",
)
@click.option(
    "--damp",
    type=FINITE_FLOAT,
    default=SPARSEGPT_DAMP,
    show_default=True,
    help="sparsegpt: fraction of mean(diag H) added to the Hessian's diagonal (0.01: as "
    "llm-compressor).",
)
@click.option(
    "--nm-select",
    type=click.Choice(NM_SELECT),
    default=NM_SELECT[0],
    show_default=True,
    help="sparsegpt --pattern: obs = the N of each M inputs whose pruning (with the OBS update) "
    "adds least to the layer's loss; score = the N lowest w²/[H⁻¹]ⱼⱼ² (the paper's rule, as "
    "llm-compressor).",
)
@dtype_option(
    "--calib-dtype",
    "wanda/sparsegpt: " + CALIB_DTYPE_HELP + " Default float32 (see docs/prune.md).",
    default="float32",
)
@calibration_options
@moe_options
@max_shard_size_option
@force_option
@progress_option
@report_option
def prune_cmd(
    model: str,
    out: str,
    method: str,
    sparsity: float | None,
    pattern: str | None,
    ignore: tuple[str, ...],
    drop: int | None,
    layers_text: str | None,
    mlp_ratio: float | None,
    keep: int | None,
    damp: float,
    nm_select: str,
    calib_dtype: str,
    calib: str | None,
    calib_samples: int,
    seq_len: int,
    device: str,
    min_expert_tokens: int,
    calibrate_all_experts: bool,
    max_shard_size: str,
    force: bool,
    progress: bool,
) -> dict:
    """Prune MODEL into OUT: zeros in place (magnitude, wanda, sparsegpt) or a smaller model
    (layers, channels, MoE experts)."""
    cfg = PruneConfig(
        method=method,
        sparsity=sparsity,
        pattern=parse_pattern(pattern) if pattern else None,
        ignore=ignore,
        calib=calib,
        calib_samples=calib_samples,
        seq_len=seq_len,
        drop=drop,
        layers=_layers(layers_text),
        mlp_ratio=mlp_ratio,
        keep=keep,
        min_expert_tokens=min_expert_tokens,
        calibrate_all_experts=calibrate_all_experts,
        damp=damp,
        nm_select=nm_select,
        calib_dtype=calib_dtype,
    )
    cfg.validate()
    if METHODS[method].needs_calibration and calib is None and not cfg.layers:
        note_builtin_calibration()
    r = prune_checkpoint(
        model,
        out,
        cfg,
        force=force,
        max_shard_size=parse_size(max_shard_size),
        device=device,
        progress=progress,
    )
    x = r.extra
    if cfg.kind == "unstructured":
        what = f"{100 * x['sparsity']:.2f}% of {x['pruned_linears']} Linears zeroed ({x['target']})"
    elif cfg.kind == "depth":
        what = f"dropped layers {x['dropped_layers']} ({x['layers_before']} -> {x['layers_after']})"
    elif cfg.kind == "experts":
        what = f"experts per layer {x['experts_before']} -> {x['experts_after']}"
    else:
        what = f"MLP width {x['width_before']} -> {x['width_after']}"
    click.echo(
        f"pruned with {method}: {what}; {format_size(x['input_size'])} -> {format_size(r.total_size)} "
        f"in {r.wall_s:.1f} s, peak RSS {format_size(r.peak_rss)} -> {r.out}"
    )
    return {"input": model, "output": r.out, "result": r.to_dict()}
