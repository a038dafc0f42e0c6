"""Post-training quantization: registered methods (RTN, MSE-clipped RTN, GPTQ, NF4, ternary)
written through registered output formats (compressed-tensors, gptq, bnb, bitnet).

Pure tensor functions live in one file per method (:mod:`~weightsmith.compress.rtn`,
:mod:`~weightsmith.compress.gptq`, ...); :func:`quantize_checkpoint` walks a checkpoint and
writes a format that transformers and vLLM load; :mod:`~weightsmith.compress.schemes` gives
Linears their own grids (mixed precision).
"""

from weightsmith.compress.quantize import QuantizeResult, quantize_checkpoint
from weightsmith.compress.registry import FORMATS, METHODS, QuantConfig, QuantizedWeight
from weightsmith.compress.schemes import Scheme, parse_scheme, parse_scheme_map

__all__ = [
    "FORMATS",
    "METHODS",
    "QuantConfig",
    "QuantizeResult",
    "QuantizedWeight",
    "Scheme",
    "parse_scheme",
    "parse_scheme_map",
    "quantize_checkpoint",
]
