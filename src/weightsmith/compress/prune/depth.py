"""Depth pruning: drop whole decoder layers that change their input the least.

Score of a layer (ShortGPT's "Block Influence", Men et al. 2024, eq. 2): one minus the mean
cosine similarity between the layer's input and output hidden state of each calibration token.
A layer whose output points where its input did mostly adds little; it is dropped first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weightsmith.compress.prune.registry import prune_method


@prune_method(
    "layers",
    kind="depth",
    needs_calibration=True,
    description="drop decoder layers with the lowest 1 - cos(input, output) on calibration data",
)
def layer_importance(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """``1 - mean_t cos(h_in[t], h_out[t])`` over every token of ``(..., hidden)`` states."""
    a = h_in.reshape(-1, h_in.shape[-1]).double()
    b = h_out.reshape(-1, h_out.shape[-1]).double()
    return float(1.0 - F.cosine_similarity(a, b, dim=-1).mean())


def least_important(scores: dict[int, float], n: int) -> list[int]:
    """The ``n`` layer indices with the lowest scores (ties: the later layer first), sorted."""
    order = sorted(scores, key=lambda i: (scores[i], -i))
    return sorted(order[:n])


def renumbering(layers: list[int], drop: set[int]) -> dict[int, int]:
    """Old index -> new index of every kept layer (consecutive from 0)."""
    kept = [i for i in sorted(layers) if i not in drop]
    return {old: new for new, old in enumerate(kept)}


def drop_from_config(config: dict, num_layers_key: str, drop: set[int]) -> tuple[dict, list[str]]:
    """``config`` with the layer count reduced and every per-layer list (a top-level list as
    long as the layer count, e.g. ``layer_types``) shortened; also the keys it edited."""
    n = int(config[num_layers_key])
    out = dict(config)
    out[num_layers_key] = n - len(drop)
    edited = [num_layers_key]
    for key, value in config.items():
        if isinstance(value, list) and len(value) == n and key != "architectures":
            out[key] = [v for i, v in enumerate(value) if i not in drop]
            edited.append(key)
    return out, edited
