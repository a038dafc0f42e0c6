"""Write the trained student through the I/O layer (atomic, sharded, with ``weightsmith.json``).

The output has exactly the tensor names, shapes and dtypes of the student checkpoint it
started from: trained weights are cast back to the stored dtype, untouched tensors are copied
byte for byte, and a LoRA is merged as W + ΔW in full precision onto the *original* weights
(for QLoRA that is the unquantized base, as users deploy it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from weightsmith.core.skeleton import module_path
from weightsmith.core.streaming import RawTensor, StreamResult, stream_transform
from weightsmith.errors import ConfigError
from weightsmith.io.reader import TensorGroup, open_checkpoint
from weightsmith.io.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointWriter,
    TensorSpec,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def write_student(
    student_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    new_weights: Callable[[str], torch.Tensor | None],
    provenance: dict,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool = False,
    extra_inputs: tuple = (),
) -> StreamResult:
    """Stream the student checkpoint to ``out``, replacing what ``new_weights(name)`` returns."""
    with open_checkpoint(student_dir) as ckpt:

        def plan(group: TensorGroup) -> list[TensorSpec]:
            return [
                TensorSpec(n, ckpt.info(n).torch_dtype, ckpt.info(n).shape) for n in group.names
            ]

        def apply(group: TensorGroup):
            for name in group.names:
                info = ckpt.info(name)
                value = new_weights(name)
                if value is None:
                    yield name, RawTensor.of(ckpt, name)
                    continue
                if tuple(value.shape) != tuple(info.shape):
                    raise ConfigError(
                        f"trained tensor {name!r} has shape {list(value.shape)}, the student "
                        f"checkpoint {list(info.shape)}"
                    )
                yield name, value.detach().to("cpu", info.torch_dtype)

        return stream_transform(
            ckpt.groups("tensor"),
            out,
            plan=plan,
            apply=apply,
            sources=[ckpt, *extra_inputs],
            support_from=ckpt.root,
            max_shard_size=max_shard_size,
            force=force,
            provenance=provenance,
            progress=progress,
            description="saving student",
        )


def full_weights(
    model,
    checkpoint_names: set[str],
    state: dict[str, torch.Tensor] | None = None,
    renames: tuple[tuple[str, str], ...] = (),
) -> Callable[[str], torch.Tensor | None]:
    """Map checkpoint names to a fully trained model's parameters (refusing unmapped ones);
    their values from ``state`` when given (an FSDP model's gathered full state dict).
    ``renames`` (the architecture's ``module_renames``) map a multimodal checkpoint's names
    (``model.layers.0...``) to its class's modules (``model.language_model.layers.0...``)."""
    params = dict(model.named_parameters())  # tied weights appear once
    if state is not None:
        params = {name: state[name] for name in params}
    stored = {module_path(model, n, renames) if renames else n: n for n in checkpoint_names}
    unmapped = sorted(set(params) - set(stored))
    if unmapped:
        raise ConfigError(
            f"cannot map {len(unmapped)} trained parameters to student checkpoint tensors "
            f"(first: {unmapped[0]!r})"
        )
    return {stored[p]: v for p, v in params.items()}.get


def merged_weights(
    student_dir: str | os.PathLike[str], deltas: dict[str, torch.Tensor]
) -> Callable[[str], torch.Tensor | None]:
    """W + ΔW for every LoRA target (computed in float32), None for the other tensors."""
    with open_checkpoint(student_dir) as ckpt:
        missing = sorted(set(deltas) - set(ckpt.tensors))
        if missing:
            raise ConfigError(f"LoRA target {missing[0]!r} is not a tensor of the student")
        root = ckpt.path

    def weight(name: str) -> torch.Tensor | None:
        if name not in deltas:
            return None
        with open_checkpoint(root) as c:
            return c.get_tensor(name).float() + deltas[name]

    return weight


def write_adapter(
    out: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    adapter_config: dict,
    provenance: dict,
    *,
    inputs: tuple = (),
    force: bool = False,
) -> Path:
    """A PEFT adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``).

    Written atomically by :class:`CheckpointWriter` under PEFT's file name.
    """
    with CheckpointWriter(
        out, max_shard_size=1 << 62, force=force, inputs=inputs, weights_name="adapter_model"
    ) as writer:
        writer.plan([TensorSpec.of(n, t) for n, t in tensors.items()])
        for name, t in tensors.items():
            writer.write(name, t)
        writer.write_json(ADAPTER_CONFIG, adapter_config)
        writer.commit({**provenance, "output_kind": "peft-adapter"})
    return Path(out).absolute()
