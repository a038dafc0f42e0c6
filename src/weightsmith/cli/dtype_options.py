"""The ``auto|float32|bfloat16`` dtype options of the calibrated commands (quantize, prune)."""

from __future__ import annotations

import click

from weightsmith.core.calibration import CALIB_DTYPES

CALIB_DTYPE_HELP = (
    "dtype of the layers' calibration forwards (auto: bfloat16 for a bfloat16 checkpoint where "
    "matmuls have it natively -- CUDA, CPUs with AVX512-BF16/AMX -- as llm-compressor does; else "
    "float32). Statistics are summed in float32."
)


def dtype_option(flag: str, help: str, default: str = "auto"):
    """A ``auto|float32|bfloat16`` choice of the calibrated methods."""
    choice = click.Choice(list(CALIB_DTYPES))
    return click.option(flag, type=choice, default=default, show_default=True, help=help)
