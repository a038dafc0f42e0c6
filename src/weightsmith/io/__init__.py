"""The streaming tensor I/O layer: the only code in weightsmith that touches checkpoint files.

- :func:`open_checkpoint` lists tensors from headers and reads one tensor (or one decoder
  layer) at a time;
- :class:`CheckpointWriter` writes sharded safetensors atomically, one tensor at a time;

The loop every transform runs on top of these lives in :mod:`weightsmith.core.streaming`.
"""

from weightsmith.io.architectures import Architecture, detect_architecture
from weightsmith.io.dtypes import parse_user_dtype
from weightsmith.io.reader import Checkpoint, TensorGroup, TensorInfo, open_checkpoint
from weightsmith.io.sizes import format_size, parse_size
from weightsmith.io.writer import CheckpointWriter, TensorSpec, WriteSummary

__all__ = [
    "Architecture",
    "Checkpoint",
    "CheckpointWriter",
    "TensorGroup",
    "TensorInfo",
    "TensorSpec",
    "WriteSummary",
    "detect_architecture",
    "format_size",
    "open_checkpoint",
    "parse_size",
    "parse_user_dtype",
]
