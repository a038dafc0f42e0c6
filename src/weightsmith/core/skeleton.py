"""The transformers model skeleton of a checkpoint (parameters on ``meta``) and the helpers
that put checkpoint tensors into it: what layer-streamed calibration and target selection
build on."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from weightsmith.core.experts import unfuse_model
from weightsmith.errors import CheckpointError
from weightsmith.io.reader import Checkpoint


def module_path(model: nn.Module, name: str, renames: Sequence[tuple[str, str]] = ()) -> str:
    """The model's path for a checkpoint name (GPT-2 checkpoints may omit ``transformer.``;
    ``renames``, an architecture's ``module_renames``, map a multimodal checkpoint's prefixes
    to the class's modules)."""
    path = name.rstrip(".")
    for old, new in renames:
        if path.startswith(old):
            renamed = new + path[len(old) :]
            with contextlib.suppress(AttributeError):
                model.get_submodule(renamed.rsplit(".", 1)[0])
                return renamed
    with contextlib.suppress(AttributeError):
        model.get_submodule(path.rsplit(".", 1)[0] if "." in path else path)
        return path
    base = getattr(model, "base_model_prefix", "")
    return f"{base}.{path}" if base else path


def assign_state(
    module: nn.Module, state: dict[str, torch.Tensor], *, where: str, strict: bool = True
) -> None:
    """Put ``state`` into ``module`` (replacing meta parameters); every parameter must be set."""
    for rel, t in state.items():
        owner_path, _, attr = rel.rpartition(".")
        try:
            owner = module.get_submodule(owner_path) if owner_path else module
        except AttributeError:
            continue  # a tensor this transformers version does not use
        if attr in owner._parameters:
            old = owner._parameters[attr]
            if tuple(old.shape) != tuple(t.shape):
                raise CheckpointError(
                    f"{where}{rel} has shape {list(t.shape)}, config expects {list(old.shape)}"
                )
            owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
        elif attr in owner._buffers:
            owner._buffers[attr] = t
    if strict:
        missing = [n for n, p in module.named_parameters() if p.is_meta]
        if missing:
            raise CheckpointError(f"{where}{missing[0]} is missing from the checkpoint")


def build_skeleton(ckpt: Checkpoint) -> nn.Module:
    """The transformers model for the checkpoint's config: parameters on meta, buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if ckpt.config is None:
        raise CheckpointError(f"{ckpt.root}: no config.json; calibration needs the model config")
    try:
        config = AutoConfig.from_pretrained(str(ckpt.root))
    except Exception as e:
        raise CheckpointError(
            f"{ckpt.root}/config.json: transformers cannot read it ({e})"
        ) from None
    if getattr(config, "quantization_config", None) is not None:
        raise CheckpointError(f"{ckpt.root}: is already quantized; calibrate an unquantized model")
    try:
        auto = AutoModelForImageTextToText if ckpt.arch.multimodal else AutoModelForCausalLM
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config)
    except ValueError as e:
        raise CheckpointError(
            f"{ckpt.root}: transformers has no causal-LM class for this config ({e})"
        ) from None
    unfuse_model(model, ckpt.arch)  # MoE: one Linear per expert, named as stored
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
