"""Choosing which modules a method touches: the ``--ignore`` pattern language, and a
checkpoint's Linear modules read from its description (no transformers model)."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from weightsmith.core.experts import is_expert_linear, is_router
from weightsmith.io.reader import Checkpoint


def ignore_matches(module: str, pattern: str) -> bool:
    """``--ignore`` patterns: an exact module name, a dotted suffix (``mlp.down_proj``), or
    ``re:<regex>`` matched against the whole module name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module) is not None
    return module == pattern or module.endswith("." + pattern)


def described_linears(ckpt: Checkpoint) -> list[str] | None:
    """The ``nn.Linear`` modules of the checkpoint's transformers class, from its tensor names
    and shapes alone (no model built, transformers not imported): every 2-D weight its
    description names as a layer Linear or a routed expert's, in checkpoint order, then the
    lm_head (a Linear even when tied to the embeddings and not stored). Module paths are the
    checkpoint's names (a text-only model: no renames). The set is the skeleton's
    (``tests/core/test_described_linears.py`` compares them); the order is not its definition
    order, so callers whose output depends on that order build the skeleton instead.

    None where the description cannot tell (or the skeleton refuses the checkpoint): no
    config.json or description, an already quantized config, a multimodal or
    Conv1D model, fused 3-D experts, an MoE on transformers < 5 (its routers were Linears),
    an lm_head stored under another name than the model's (GPT-NeoX's ``embed_out``), Linear
    weights of more than one dtype, or any 2-D tensor it does not name."""
    arch = ckpt.arch
    if (
        ckpt.config is None
        or "quantization_config" in ckpt.config  # refused by the skeleton's checks
        or not arch.known
        or arch.multimodal
        or arch.linear_layout != "out_in"
        or arch.lm_head != "lm_head.weight"  # GPT-NeoX's embed_out is transformers 5's lm_head
        or (arch.experts is not None and not _routers_are_modules(arch.experts.storage))
    ):
        return None
    dense = {n for group in arch.sequential_linears for n in group}
    linears, dtypes = [], set()
    for name in ckpt.tensors:
        info = ckpt.info(name)
        if len(info.shape) != 2 or name in arch.embed or name == arch.lm_head:
            continue  # norms, biases, embeddings (the lm_head is added last)
        prefix = arch.layer_prefix(name)
        if prefix is None or not name.endswith(".weight"):
            return None
        rel = name[len(prefix) : -len(".weight")]
        if is_router(arch, name):
            continue  # transformers 5's routers are their own modules, not Linears
        if rel not in dense and not is_expert_linear(arch, rel):
            return None
        linears.append(name[: -len(".weight")])
        dtypes.add(info.dtype)
    if len(dtypes) > 1:
        return None
    return [*linears, "lm_head"]


def _routers_are_modules(storage: str) -> bool:
    """Per-expert MoE checkpoints: transformers >= 5 holds routers as their own modules (not
    ``nn.Linear``) and the experts fused, which the skeleton unfuses into Linears."""
    if storage != "per_expert":
        return False
    try:
        return int(version("transformers").split(".")[0]) >= 5
    except (PackageNotFoundError, ValueError):
        return False
