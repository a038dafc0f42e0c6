"""Quantization-aware training (fake-quant RTN + STE) and BitNet b1.58 continued training.

Pure quantizers live in :mod:`.fake_quant`, the training Linears in :mod:`.modules`, the
training task handed to the shared engine in :mod:`.task`; :func:`qat_checkpoint` and :func:`bitnet_checkpoint` train and
convert with :func:`weightsmith.compress.quantize_checkpoint`.
"""

from weightsmith.compress.qat.config import BitnetConfig, QatConfig, TrainConfig
from weightsmith.compress.qat.run import QatResult, bitnet_checkpoint, qat_checkpoint

__all__ = [
    "BitnetConfig",
    "QatConfig",
    "QatResult",
    "TrainConfig",
    "bitnet_checkpoint",
    "qat_checkpoint",
]
