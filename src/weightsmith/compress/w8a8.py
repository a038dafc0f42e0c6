"""W8A8 int8 (``--method w8a8``): int8 weights with one symmetric absmax scale per output
channel and dynamic per-token int8 activations at inference (llm-compressor's ``W8A8`` preset),
written as compressed-tensors ``int-quantized``. Data-free and streamed one tensor at a time,
weights and scales bit-identical to llm-compressor's ``model_free_ptq(scheme="W8A8")``; with
``--smoothquant [--alpha A]`` the calibration text runs through the model one decoder layer
at a time and each layer is smoothed (:mod:`.smoothquant`) before its Linears are quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightsmith.compress.ct_config import ct_args, ct_scheme
from weightsmith.compress.registry import CalibratedConfig, quant_method
from weightsmith.compress.scaled import ScaledWeight, scaled_quantize
from weightsmith.compress.smoothquant import smoothquant_layer
from weightsmith.errors import ConfigError


@dataclass(frozen=True)
class W8A8Config(CalibratedConfig):
    """``--method w8a8``: int8 per-channel weights; ``smoothquant`` migrates activation
    outliers into the weights first (calibrated, strength ``alpha``)."""

    smoothquant: bool = False
    alpha: float = 0.5

    kind = "int8"  # the 8-bit grid (scaled.py)
    block = None  # one scale per output channel

    @property
    def statistic(self) -> str | None:  # calibrated only with SmoothQuant
        return "channel_range" if self.smoothquant else None

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must be between 0 and 1 (got {self.alpha})")
        calibration = (self.calib, self.calib_samples, self.seq_len, self.alpha)
        if not self.smoothquant and calibration != (None, 128, 512, 0.5):
            raise ConfigError(
                "--calib, --calib-samples, --seq-len and --alpha apply to --method w8a8 "
                "with --smoothquant"
            )

    def describe(self) -> dict:
        return {"bits": 8, "group_size": -1, "symmetric": True, "smoothquant": self.smoothquant,
                **({"alpha": self.alpha} if self.smoothquant else {})}  # fmt: skip

    def ct_group(self) -> tuple[str, dict]:
        """llm-compressor's preset name and its scheme (config.json's config group)."""
        return "W8A8", ct_scheme(
            "int-quantized",
            ct_args(8, "int", "channel"),
            ct_args(8, "int", "token", dynamic=True),
        )

    def layer_step(self, cl, job):  # the calibrated layer step (see compress/calibrated.py)
        return smoothquant_layer(cl, job)


@quant_method("w8a8", config=W8A8Config, formats=("int-quantized",),
              summary="int8 per-channel weights + dynamic per-token int8 activations "
                      "(--smoothquant: calibrated)")  # fmt: skip
def w8a8_quantize(
    w: torch.Tensor, cfg: W8A8Config, stat=None, *, dtype=None, zero_min=None
) -> ScaledWeight:
    """int8 levels and absmax scales (``max|w| / 127.5``) of ``w`` in its own dtype."""
    return scaled_quantize(w, "int8", None)
