"""Post-training quantization: RTN, GPTQ (layer-streamed calibration) and NF4.

Pure tensor functions live in :mod:`~weightsmith.compress.rtn` and
:mod:`~weightsmith.compress.gptq`; :func:`quantize_checkpoint` walks a checkpoint and writes
a format that transformers and vLLM load.
"""

from weightsmith.compress.quantize import QuantizeResult, quantize_checkpoint
from weightsmith.compress.registry import FORMATS, METHODS, QuantConfig, QuantizedWeight

__all__ = [
    "FORMATS",
    "METHODS",
    "QuantConfig",
    "QuantizeResult",
    "QuantizedWeight",
    "quantize_checkpoint",
]
