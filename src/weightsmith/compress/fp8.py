"""FP8-E4M3 weights, data-free and streamed one tensor at a time (``--method fp8``):

- ``--scheme dynamic`` (llm-compressor's ``FP8_DYNAMIC``): one scale per output channel, and
  dynamic per-token FP8 activations at inference;
- ``--scheme block`` (``FP8_BLOCK``, DeepSeek-V3 style): one scale per 128×128 block, and
  dynamic FP8 activations per group of 128 input channels.

Written as compressed-tensors ``float-quantized`` (``--format float-quantized``), weights and
scales bit-identical to llm-compressor's ``model_free_ptq`` (see :mod:`.scaled`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.compress.ct_config import ct_args, ct_scheme
from weightsmith.compress.registry import MethodConfig, quant_method
from weightsmith.compress.scaled import ScaledWeight, scaled_quantize
from weightsmith.errors import ConfigError

BLOCK = (128, 128)
SCHEMES = ("dynamic", "block")


@dataclass(frozen=True)
class FP8Config(MethodConfig):
    """``--method fp8``: FP8-E4M3 weights with absmax scales (no calibration)."""

    scheme: str = "dynamic"  # "dynamic": per channel (FP8_DYNAMIC); "block": 128x128 (FP8_BLOCK)

    kind = "fp8"  # the 8-bit grid (scaled.py)

    def validate(self) -> None:
        super().validate()
        if self.scheme not in SCHEMES:
            raise ConfigError(f"--scheme must be one of {', '.join(SCHEMES)} (got {self.scheme!r})")

    @property
    def block(self) -> tuple[int, int] | None:
        return BLOCK if self.scheme == "block" else None

    def describe(self) -> dict:
        return {"bits": 8, "scheme": self.scheme, "symmetric": True,
                "group_size": -1 if self.block is None else BLOCK[1]}  # fmt: skip

    def ct_group(self) -> tuple[str, dict]:
        """llm-compressor's preset name and its scheme (config.json's config group)."""
        if self.block is None:
            return "FP8_DYNAMIC", ct_scheme(
                "float-quantized",
                ct_args(8, "float", "channel"),
                ct_args(8, "float", "token", dynamic=True),
            )
        return "FP8_BLOCK", ct_scheme(
            "float-quantized",
            ct_args(8, "float", "block", block_structure=list(BLOCK)),
            ct_args(8, "float", "group", dynamic=True, group_size=BLOCK[1]),
        )


@quant_method("fp8", config=FP8Config, formats=("float-quantized",),
              summary="FP8-E4M3 weights, per channel or 128x128 blocks (no calibration)")  # fmt: skip
def fp8_quantize(
    w: torch.Tensor, cfg: FP8Config, stat=None, *, dtype=None, zero_min=None
) -> ScaledWeight:
    """FP8-E4M3 levels and absmax scales of ``w`` in its own dtype (as model_free_ptq)."""
    return scaled_quantize(w, "fp8", cfg.block)
