"""Commands of the `compress` group (registered on import by weightsmith.cli.main)."""

from __future__ import annotations

import dataclasses

import click
from click.core import ParameterSource

# Methods and formats register on import; the choices below come from the registries.
import weightsmith.compress.quantize  # noqa: F401
from weightsmith.cli.budget_options import bits_budget_options, budget_request, run_budget
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
from weightsmith.cli.gguf_options import gguf_options, gguf_summary, write_gguf_file
from weightsmith.cli.groups import compress_cli
from weightsmith.compress.gptq import DEFAULT_DAMP, DEFAULT_OBSERVER
from weightsmith.compress.registry import FORMATS, METHODS
from weightsmith.errors import ConfigError
from weightsmith.io.sizes import format_size, parse_size


@compress_cli.command("quantize")
@click.argument("model", type=MODEL)
@click.option(
    "-o", "--out", required=True, type=click.Path(),
    help="Output directory (a .gguf file with --format gguf).",
)  # fmt: skip
@click.option(
    "--method", type=click.Choice(sorted(METHODS)), default="rtn", show_default=True,
    help="With --format gguf: rtn (the --type's own llama.cpp quantizer, importance-weighted "
    "with --calib/--imatrix, data-free without) or ternary (--type TQ1_0/TQ2_0).",
)  # fmt: skip
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
    "--scheme-map",
    "schemes",  # the recipe key: `schemes: {down_proj: w8g128, ...}`
    multiple=True,
    metavar="PATTERN=SCHEME",
    help="Mixed precision: Linears matching PATTERN (as --ignore) get SCHEME, "
    "w<bits>[g<group>][a] (e.g. w8g128, w4 = per channel, trailing a = asymmetric) or keep "
    "(unquantized); repeatable, first match wins; the rest use --bits/--group-size/--sym. "
    "rtn, gptq, awq, mse into compressed-tensors (one config group per scheme).",
)
@click.option(
    "--format",
    "format",  # the recipe key too (`format: gguf`)
    type=click.Choice([*sorted(FORMATS), "gguf"]),
    default=None,
    help="Output format; default: the method's own (nf4: bnb, ternary: bitnet, others: "
    "compressed-tensors). gguf: one llama.cpp file of --type T (--method rtn or ternary), "
    "the same file as `convert --format gguf`.",
)
@gguf_options
@calibration_options
@bits_budget_options
@moe_options
@click.option(
    "--act-order/--no-act-order",
    default=True,
    show_default=True,
    help="GPTQ: quantize columns by decreasing Hessian diagonal (static groups; the default "
    "by held-out measurement). --no-act-order: in order, as llm-compressor's default.",
)
@click.option(
    "--damp",
    type=FINITE_FLOAT,
    default=DEFAULT_DAMP,
    show_default=True,
    help="GPTQ: dampening, fraction of mean diag(H).",
)
@click.option(
    "--observer",
    type=click.Choice(["minmax", "mse"]),
    default=DEFAULT_OBSERVER,
    show_default=True,
    help="GPTQ: each group's qparams from its min/max, or the clipped range with the least "
    "squared error (as --method mse).",
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
@click.option(
    "--awq-propagate",
    type=click.Choice(["auto", "float", "quantized"]),
    default="auto",
    show_default=True,
    help="AWQ: the next layer is calibrated on the float smoothed outputs or the quantized "
    "ones (auto: float after rtn, as llm-compressor; quantized after gptq).",
)
@click.option(
    "--awq-clip/--no-awq-clip",
    default=True,
    show_default=True,
    help="AWQ: AutoAWQ's clipping search (each group's range shrunk where that lowers its "
    "output error; q/k_proj not clipped) after the scales.",
)
@dtype_option(
    "--awq-search-dtype",
    "AWQ: dtype of the scale search's forwards (auto: bfloat16 where matmuls have it natively "
    "-- CUDA, CPUs with AVX512-BF16/AMX -- else float32); losses summed in float64.",
)
@dtype_option("--calib-dtype", "Calibrated methods: " + CALIB_DTYPE_HELP)
@max_shard_size_option
@force_option
@progress_option
@report_option
def quantize_cmd(
    model: str,
    out: str,
    method: str,
    ignore: tuple[str, ...],
    device: str,
    max_shard_size: str,
    force: bool,
    progress: bool,
    **options,
) -> dict:
    """Quantize the Linear weights of MODEL into OUT with a registered method (RTN, MSE,
    GPTQ, AWQ, NF4, BitNet ternary, FP8, W8A8/SmoothQuant, NVFP4, MXFP4). Only the options you give are passed on: one that the method
    or format does not have is an error. ``--format gguf --type T`` writes one llama.cpp file
    instead (--method rtn or ternary; the same file as ``convert --format gguf``)."""
    from weightsmith.compress import QuantConfig, quantize_checkpoint
    from weightsmith.compress.schemes import parse_scheme_map

    fmt = options.pop("format")
    schemes = parse_scheme_map(options.pop("schemes"))  # a bad scheme: before anything else
    budget = budget_request(options, options["calib"], lambda k: not _is_default(k))
    gguf = {k: options.pop(k) for k in ("type", "imatrix", "save_imatrix")}
    if fmt == "gguf" or any(v is not None for v in gguf.values()):
        if schemes or budget:
            flag = "--scheme-map" if schemes else "--bits-budget"
            raise ConfigError(f"{flag} does not apply to --format gguf: the --type decides")
        return _quantize_gguf(
            model, out, method, fmt, ignore, device, force, progress, gguf, options
        )
    given = {_OPTION_NAMES.get(k, k): v for k, v in options.items() if not _is_default(k)}
    cfg = QuantConfig(method, format=fmt, ignore=ignore, schemes=schemes, **given)
    cfg.validate()
    calibrated = METHODS[method].statistic_for(cfg.options) is not None
    if options["calib"] is None and (calibrated or (budget and budget.report is None)):
        note_builtin_calibration()
    plan = None
    if budget is not None:
        budget = dataclasses.replace(budget, device=device)  # the sensitivity pass runs there too
        cfg, plan = _budget_config(model, out, force, cfg, budget, progress)
        schemes = cfg.schemes
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
    for note in x.get("notes", []):  # e.g. MoE experts kept as stored
        click.echo(f"note: {note}", err=True)
    fallbacks = f", {len(x['rtn_fallbacks'])} RTN fallbacks" if x.get("rtn_fallbacks") else ""
    grid = f"{x['bits']}-bit"
    if schemes:
        per = x["schemes"]["per_scheme"]
        grid = ", ".join(f"{k} x{v['linears']}" for k, v in per.items())
        grid = f"mixed ({grid}; {x['schemes']['average_bits_per_weight']:.2f} bits/weight)"
    click.echo(
        f"quantized {x['quantized_linears']} Linears ({100 * x['fraction_quantized']:.1f}% of "
        f"parameters) with {method} {grid} into {x.get('format', cfg.format)}: "
        f"{format_size(x['input_size'])} -> {format_size(x['output_size'])}{fallbacks} "
        f"in {r.wall_s:.1f} s, peak RSS {format_size(r.peak_rss)} -> {r.out}"
    )
    if plan is not None:
        return {"input": model, "output": r.out, "result": r.to_dict(), "bits_budget": plan}
    return {"input": model, "output": r.out, "result": r.to_dict()}


def _budget_config(model, out, force, cfg, budget, progress):
    """``--bits-budget``: checks before the sensitivity pass (OUT, a grid method into a format
    with per-module grids, no --scheme-map), then the plan as the config's scheme map; returns
    (config, plan summary for the report)."""
    from pathlib import Path

    from weightsmith.compress import QuantConfig
    from weightsmith.io.paths import check_output_location

    def with_map(schemes) -> QuantConfig:
        return QuantConfig(cfg.method, cfg.format, cfg.ignore, options=cfg.options,
                           format_options=cfg.format_options, schemes=schemes)  # fmt: skip

    if cfg.schemes:
        raise ConfigError("--bits-budget chooses the schemes: do not give --scheme-map too")
    check_output_location(Path(out), [Path(model)], force)
    try:
        with_map({"re:.*": "w4g64"}).validate()
    except ConfigError as e:
        raise ConfigError(str(e).replace("--scheme-map", "--bits-budget")) from None
    outcome = run_budget(model, budget, progress)
    new = with_map(outcome.scheme_map)
    new.validate()
    return new, {**outcome.summary(), "sensitivity": outcome.sensitivity}


# why each method cannot feed a GGUF --type (rtn can: the type's own quantizer is its RTN;
# ternary can: TQ1_0/TQ2_0 store its levels and scales exactly)
_NOT_GGUF = {
    "gptq": "its error-compensated weights fit its own integer grid, which the GGUF type would "
    "round again",
    "mse": "it searches scales for its own integer grid; the GGUF type's search chooses its own",
}
_GGUF_CALIBRATION = ("calib", "calib_samples", "seq_len")


def _quantize_gguf(model, out, method, fmt, ignore, device, force, progress, gguf, options):
    """``--format gguf``: the ``convert --format gguf`` path, fed by ``--method rtn`` (or the
    ternary method's levels, as TQ1_0/TQ2_0)."""
    from weightsmith.convert import ImatrixOptions, ternary_gguf

    if fmt != "gguf":
        raise ConfigError("--type/--imatrix/--save-imatrix apply to --format gguf only")
    if method not in ("rtn", "ternary"):
        why = _NOT_GGUF.get(method, "its values have no GGUF tensor type")
        raise ConfigError(f"--format gguf is fed by --method rtn or ternary, not {method}: {why}")
    if gguf["type"] is None:
        raise ConfigError("--format gguf needs --type (e.g. Q4_K_M, Q8_0)")
    if not _is_default("max_shard_size"):
        raise ConfigError("--max-shard-size does not apply to --format gguf (one file)")
    if method == "ternary":
        if gguf["imatrix"] or gguf["save_imatrix"] or options["calib"]:
            raise ConfigError("--calib/--imatrix do not apply to --method ternary (data-free)")
        given = {k: v for k, v in options.items() if not _is_default(k)}
        other = sorted(set(given) - {"linear_class", "use_rms_norm", "rms_norm_eps"})
        if other:
            flag = "--" + {"sym": "sym/--asym"}.get(other[0], other[0]).replace("_", "-")
            raise ConfigError(f"{flag} does not apply to --method ternary --format gguf")
        result = ternary_gguf(model, out, type_name=gguf["type"], ignore=ignore, force=force,
                              progress=progress, **given)  # fmt: skip
        return gguf_summary(model, result)
    extra = [k for k in options if k not in _GGUF_CALIBRATION and not _is_default(k)]
    extra += ["ignore"] * bool(ignore)
    if extra:
        flag = "--" + {"sym": "sym/--asym"}.get(extra[0], extra[0]).replace("_", "-")
        raise ConfigError(f"{flag} does not apply to --format gguf: the --type decides")
    importance = ImatrixOptions(
        imatrix=gguf["imatrix"], calib=options["calib"], samples=options["calib_samples"],
        seq_len=options["seq_len"], device=device, save=gguf["save_imatrix"],
    )  # fmt: skip
    return write_gguf_file(
        model, out, gguf["type"], importance, force=force, allow_pickle=False, progress=progress
    )


_OPTION_NAMES = {"sym": "symmetric"}  # CLI parameter -> option name


def _is_default(param: str) -> bool:
    src = click.get_current_context().get_parameter_source(param)
    return src in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
