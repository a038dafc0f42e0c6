"""Pruning: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT) and structured pruning that
shrinks the model (decoder layers, MLP channels).

Pure functions on tensors live in :mod:`.masks`, :mod:`.magnitude`, :mod:`.wanda`,
:mod:`.depth` and :mod:`.width`; :func:`prune_checkpoint` streams a checkpoint through them.
Methods register with ``@prune_method("name", kind=...)``; :data:`METHODS` lists them.
"""

from weightsmith.compress.prune import (  # noqa: F401  (register)
    depth,
    magnitude,
    sparsegpt,
    wanda,
    width,
)
from weightsmith.compress.prune import experts as _experts  # noqa: F401  (registers experts)
from weightsmith.compress.prune.api import prune_checkpoint
from weightsmith.compress.prune.common import PruneResult
from weightsmith.compress.prune.depth import layer_importance
from weightsmith.compress.prune.magnitude import magnitude_scores
from weightsmith.compress.prune.masks import (
    check_sparsity,
    nm_mask,
    prune_mask,
    row_mask,
    tensor_mask,
)
from weightsmith.compress.prune.registry import METHODS, PruneConfig, parse_pattern, prune_method
from weightsmith.compress.prune.sparsegpt import SparseWeight, sparsegpt_prune
from weightsmith.compress.prune.wanda import wanda_scores
from weightsmith.compress.prune.width import channel_importance

__all__ = [
    "METHODS",
    "PruneConfig",
    "PruneResult",
    "SparseWeight",
    "channel_importance",
    "check_sparsity",
    "layer_importance",
    "magnitude_scores",
    "nm_mask",
    "parse_pattern",
    "prune_checkpoint",
    "prune_mask",
    "prune_method",
    "row_mask",
    "sparsegpt_prune",
    "tensor_mask",
    "wanda_scores",
]
