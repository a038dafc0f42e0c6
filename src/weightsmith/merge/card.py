"""A short model card (README.md) written beside merged weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from weightsmith.merge.methods import MERGE_METHODS

if TYPE_CHECKING:
    from weightsmith.merge.plan import MergePlan
    from weightsmith.merge.recipe import MergeRecipe


def model_card(recipe: MergeRecipe, plan: MergePlan) -> str:
    cls = MERGE_METHODS.get(recipe.merge_method)
    title = cls.title if cls else "Passthrough (layer slices)"
    ref = f" ([paper]({cls.reference}))" if cls and cls.reference else ""
    models = "\n".join(f"- `{m}`" for m in recipe.referenced_models())
    base = f"\nBase model: `{recipe.base_model}`\n" if recipe.base_model else ""
    return (
        "---\ntags:\n- merge\n- weightsmith\n---\n"
        f"# Merged model\n\nThis model was made with weightsmith's `{recipe.merge_method}` "
        f"merge: {title}{ref}.\n{base}\n## Models merged\n\n{models}\n\n"
        f"Output: {len(plan.jobs)} tensors, {plan.num_layers} decoder layers.\n\n"
        "## Recipe (mergekit-compatible)\n\n```yaml\n"
        f"{recipe.to_yaml()}```\n"
    )
