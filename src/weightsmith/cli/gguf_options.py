"""The GGUF options ``convert --format gguf`` and ``compress quantize --format gguf`` share, and
the one function both run (:func:`weightsmith.convert.convert_gguf`)."""

from __future__ import annotations

from collections.abc import Callable

import click

from weightsmith.io.sizes import format_size

GGUF_TYPE_HELP = (
    "GGUF tensor type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0, or a "
    "K-quant mix (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K). Only with --format gguf "
    "(convert: default F16; compress quantize: required)."
)


def gguf_options(fn: Callable) -> Callable:
    """``--type``, ``--imatrix`` and ``--save-imatrix`` (the ``--calib`` text is each
    command's own calibration option)."""
    for opt in reversed(
        [
            click.option("--type", "type", default=None, help=GGUF_TYPE_HELP),
            click.option(
                "--imatrix",
                type=click.Path(dir_okay=False),
                default=None,
                help="GGUF: weight the quantization by this llama.cpp imatrix file (GGUF or "
                "legacy .dat).",
            ),
            click.option(
                "--save-imatrix",
                type=click.Path(dir_okay=False),
                default=None,
                help="GGUF: also save the --calib importance matrix in llama.cpp's imatrix format.",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def write_gguf_file(
    path: str, out: str, type_name: str, importance, *, force: bool, allow_pickle: bool,
    progress: bool,
) -> dict:  # fmt: skip
    """Run :func:`~weightsmith.convert.convert_gguf` and print the one-line summary; the
    command's report payload."""
    from weightsmith.convert import convert_gguf

    result = convert_gguf(
        path, out, type_name=type_name, force=force, allow_pickle=allow_pickle,
        progress=progress, importance=importance,
    )  # fmt: skip
    return gguf_summary(path, result, importance)


def gguf_summary(path: str, result, importance=None) -> dict:
    """Print a GGUF write's one-line summary; the command's report payload."""
    fell_back = f", {len(result.fallbacks)} fallback(s)" if result.fallbacks else ""
    if importance is not None and (importance.imatrix or importance.calib):
        fell_back += f", imatrix used by {result.imatrix_tensors} tensors"
    click.echo(
        f"wrote {result.tensors} tensors as {result.type} GGUF ({result.architecture}, "
        f"{format_size(result.total_size)}{fell_back}) in {result.wall_s:.1f} s, peak RSS "
        f"{format_size(result.peak_rss)} -> {result.out}"
    )
    return {"input": path, "output": result.out, "result": result.to_dict()}
