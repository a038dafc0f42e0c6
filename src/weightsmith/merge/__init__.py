"""Merging: linear, SLERP, task arithmetic, TIES, DARE, passthrough slices and LoRA-into-base.

- pure tensor functions in :mod:`weightsmith.merge.methods` (registry: ``@merge_method``);
- :class:`MergeRecipe` (mergekit's YAML schema) and :func:`merge` that streams it to disk;
- :func:`merge_lora` folds a PEFT LoRA adapter into its base model.
"""

from weightsmith.merge.api import merge, resolve_model
from weightsmith.merge.methods import (
    MERGE_METHODS,
    dare_merge,
    linear_merge,
    merge_method,
    merge_tensors,
    slerp_merge,
    task_arithmetic_merge,
    ties_merge,
)
from weightsmith.merge.recipe import (
    InputSlice,
    MergeRecipe,
    ModelInput,
    OutputSlice,
    load_recipe,
    recipe_from_dict,
)

__all__ = [
    "MERGE_METHODS",
    "InputSlice",
    "MergeRecipe",
    "ModelInput",
    "OutputSlice",
    "dare_merge",
    "linear_merge",
    "load_recipe",
    "merge",
    "merge_method",
    "merge_tensors",
    "recipe_from_dict",
    "resolve_model",
    "slerp_merge",
    "task_arithmetic_merge",
    "ties_merge",
]
