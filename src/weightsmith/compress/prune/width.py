"""Width pruning: remove the MLP intermediate channels that contribute least.

Removing channel ``j`` of a layer's MLP changes the MLP output by the rank-one matrix
``x_j w_j^T`` (``x_j``: channel ``j``'s activation over the calibration tokens, the input
column ``j`` of the down projection; ``w_j``: column ``j`` of the down projection), whose
Frobenius norm is exactly ``||x_j||_2 * ||w_j||_2``. That product is the importance score, the
structured analogue of Wanda's (cf. Wanda-sp / FLAP).
"""

from __future__ import annotations

import torch

from weightsmith.compress.prune.registry import prune_method

# Config keys that hold the MLP width, in the order they are tried (GPT-2 calls it n_inner).
WIDTH_KEYS = ("intermediate_size", "n_inner", "ffn_dim")


@prune_method(
    "channels",
    kind="width",
    needs_calibration=True,
    description="drop MLP channels with the lowest ||x_j||_2 * ||W_down[:, j]||_2",
)
def channel_importance(act_norm: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``||x_j||_2 * ||W_down[:, j]||_2`` per channel; ``w_down`` is ``(hidden, intermediate)``."""
    if act_norm.shape != (w_down.shape[1],):
        raise ValueError(
            f"activation norms {tuple(act_norm.shape)} do not fit down weight {tuple(w_down.shape)}"
        )
    return act_norm.float() * w_down.float().norm(dim=0)


def channels_to_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, ascending (ties: the lower index is kept)."""
    order = torch.sort(-scores, stable=True).indices[:keep]
    return torch.sort(order).values


def kept_width(width: int, ratio: float) -> int:
    """Channels kept when keeping ``ratio`` of ``width`` (rounded to nearest, at least 1)."""
    return max(1, min(width, round(width * ratio)))
