"""BitNet b1.58 quantizers as pure tensor functions (Ma et al., 2024, "The Era of 1-bit LLMs").

Weights: absmean ternary, ``W̃ = clip(round(W / γ), -1, 1)`` with ``γ = mean|W|`` per tensor.
Activations: absmax int8 per token, ``x̃ = clip(round(x · 127 / max|x|), -128, 127)``.
Both clamp their scale denominators at 1e-5, as transformers' BitNet integration does, so the
training forward, the packed checkpoint and transformers' inference agree.
"""

from __future__ import annotations

import torch

EPS = 1e-5


def absmean_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary levels (int8 in {-1, 0, 1}) and the per-tensor scale ``γ = mean|W|`` (float32,
    0-d) with ``W ≈ levels · γ``."""
    wf = w.float()
    gamma = wf.abs().mean().clamp(min=EPS)
    q = torch.clamp(torch.round(wf / gamma), -1, 1).to(torch.int8)
    return q, gamma


def absmax_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) symmetric int8 levels and the multiplier ``127 / max|x|`` with
    ``x ≈ levels / multiplier`` (the convention of transformers' ``BitLinear``)."""
    xf = x.float()
    mult = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return torch.clamp(torch.round(xf * mult), -128, 127), mult
