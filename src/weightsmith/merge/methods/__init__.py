"""Merge methods: pure tensor code, registered by name with ``@merge_method``.

Adding a method is one module here (imported below) and one test.
"""

from weightsmith.merge.methods import (  # noqa: F401
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    ram,
    ramplus_tl,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from weightsmith.merge.methods.base import (
    MERGE_METHODS,
    ChunkSource,
    MergeMethod,
    Param,
    TensorChunks,
    TensorParams,
    get_method,
    merge_method,
    merge_tensors,
    run_method,
)
from weightsmith.merge.methods.breadcrumbs import breadcrumbs as breadcrumbs_merge
from weightsmith.merge.methods.dare import dare as dare_merge
from weightsmith.merge.methods.della import della as della_merge
from weightsmith.merge.methods.linear import linear as linear_merge
from weightsmith.merge.methods.nearswap import nearswap as nearswap_merge
from weightsmith.merge.methods.sce import sce as sce_merge
from weightsmith.merge.methods.slerp import slerp as slerp_merge
from weightsmith.merge.methods.task_arithmetic import task_arithmetic as task_arithmetic_merge
from weightsmith.merge.methods.ties import ties as ties_merge

__all__ = [
    "MERGE_METHODS",
    "ChunkSource",
    "MergeMethod",
    "Param",
    "TensorChunks",
    "TensorParams",
    "breadcrumbs_merge",
    "dare_merge",
    "della_merge",
    "get_method",
    "linear_merge",
    "merge_method",
    "merge_tensors",
    "nearswap_merge",
    "run_method",
    "sce_merge",
    "slerp_merge",
    "task_arithmetic_merge",
    "ties_merge",
]
