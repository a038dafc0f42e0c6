"""Commands of the `compress` group (registered on import by weightsmith.cli.main)."""

from __future__ import annotations

import click
from click.core import ParameterSource

# Methods and formats register on import; the choices below come from the registries.
import weightsmith.compress.quantize  # noqa: F401
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
from weightsmith.cli.groups import compress_cli
from weightsmith.compress.registry import FORMATS, METHODS
from weightsmith.io.sizes import format_size, parse_size


@compress_cli.command("quantize")
@click.argument("model", type=MODEL)
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory.")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="rtn", show_default=True)
@click.option("--bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option(
    "--group-size",
    type=int,
    default=128,
    show_default=True,
    help="Input columns per scale; -1 = per output channel.",
)
@click.option(
    "--sym/--asym",
    default=True,
    show_default=True,
    help="Symmetric or asymmetric (zero point) levels.",
)
@click.option(
    "--ignore",
    multiple=True,
    help="Keep this Linear unquantized (name, dotted suffix, or re:REGEX); repeatable. lm_head is always kept.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(sorted(FORMATS)),
    default=None,
    help="Output format; default: the method's own (nf4: bnb, ternary: bitnet, others: "
    "compressed-tensors).",
)
@calibration_options
@moe_options
@click.option(
    "--act-order",
    is_flag=True,
    help="GPTQ: quantize columns by decreasing Hessian diagonal (static groups).",
)
@click.option(
    "--damp",
    type=FINITE_FLOAT,
    default=0.01,
    show_default=True,
    help="GPTQ: dampening, fraction of mean diag(H).",
)
@click.option(
    "--allow-rtn-fallback",
    is_flag=True,
    help="GPTQ: use RTN for a Linear whose Hessian is not positive definite (listed in the report).",
)
@click.option("--double-quant", is_flag=True, help="NF4: also quantize the absmax constants.")
@click.option(
    "--linear-class",
    type=click.Choice(["bitlinear", "autobitlinear"]),
    default="bitlinear",
    show_default=True,
    help="Ternary: transformers' BitNet module (decides how weight_scale is stored).",
)
@click.option(
    "--use-rms-norm", is_flag=True, help="Ternary: RMSNorm before each BitLinear's activations."
)
@click.option(
    "--rms-norm-eps",
    type=FINITE_FLOAT,
    default=1e-6,
    show_default=True,
    help="Ternary: RMSNorm epsilon.",
)
@click.option(
    "--hqq", is_flag=True, help="RTN: refine the qparams by HQQ's half-quadratic solver (no data)."
)
@click.option(
    "--hqq-iters", type=click.IntRange(min=1), default=20, show_default=True,
    help="RTN --hqq: most solver iterations (it stops early when the error stops falling).",
)  # fmt: skip
@click.option(
    "--scheme",
    type=click.Choice(["dynamic", "block"]),
    default="dynamic",
    show_default=True,
    help="FP8: per-channel weights + dynamic per-token activations (FP8_DYNAMIC), or 128x128 "
    "weight blocks (FP8_BLOCK).",
)
@click.option(
    "--smoothquant",
    is_flag=True,
    help="W8A8: SmoothQuant (calibrated) before quantizing: activation outliers folded into "
    "the norms and the next Linears.",
)
@click.option(
    "--alpha",
    type=FINITE_FLOAT,
    default=0.5,
    show_default=True,
    help="W8A8 --smoothquant: migration strength (0: none, 1: all onto the weights).",
)
@click.option(
    "--awq-then",
    type=click.Choice(["rtn", "gptq"]),
    default="rtn",
    show_default=True,
    help="AWQ: the quantizer run on the scaled weights (gptq takes --damp/--act-order).",
)
@click.option(
    "--n-grid", type=click.IntRange(min=2), default=20, show_default=True,
    help="AWQ: grid points of the scale-exponent search.",
)  # fmt: skip
@click.option(
    "--duo-scaling",
    type=click.Choice(["true", "false", "both"]),
    default="true",
    show_default=True,
    help="AWQ: scales x^r / w^(1-r) (true), x^r (false), or half the grid each (both).",
)
@max_shard_size_option
@force_option
@progress_option
@report_option
def quantize_cmd(
    model: str,
    out: str,
    method: str,
    ignore: tuple[str, ...],
    fmt: str | None,
    device: str,
    max_shard_size: str,
    force: bool,
    progress: bool,
    **options,
) -> dict:
    """Quantize the Linear weights of MODEL into OUT with a registered method (RTN, MSE,
    GPTQ, AWQ, NF4, BitNet ternary, FP8, W8A8/SmoothQuant, NVFP4, MXFP4). Only the options you give are passed on: one that the method
    or format does not have is an error."""
    from weightsmith.compress import QuantConfig, quantize_checkpoint

    given = {_OPTION_NAMES.get(k, k): v for k, v in options.items() if not _is_default(k)}
    cfg = QuantConfig(method, format=fmt, ignore=ignore, **given)
    cfg.validate()
    if METHODS[method].statistic_for(cfg.options) is not None and cfg.calib is None:
        note_builtin_calibration()
    r = quantize_checkpoint(
        model,
        out,
        cfg,
        force=force,
        max_shard_size=parse_size(max_shard_size),
        device=device,
        progress=progress,
    )
    x = r.extra
    fallbacks = f", {len(x['rtn_fallbacks'])} RTN fallbacks" if x.get("rtn_fallbacks") else ""
    click.echo(
        f"quantized {x['quantized_linears']} Linears ({100 * x['fraction_quantized']:.1f}% of "
        f"parameters) with {method} {x['bits']}-bit into {cfg.format}: "
        f"{format_size(x['input_size'])} -> {format_size(x['output_size'])}{fallbacks} "
        f"in {r.wall_s:.1f} s, peak RSS {format_size(r.peak_rss)} -> {r.out}"
    )
    return {"input": model, "output": r.out, "result": r.to_dict()}


_OPTION_NAMES = {"sym": "symmetric"}  # CLI parameter -> option name


def _is_default(param: str) -> bool:
    src = click.get_current_context().get_parameter_source(param)
    return src in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
