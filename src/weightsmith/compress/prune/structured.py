"""Drivers for structured pruning, whose output is a genuinely smaller model.

* depth (``layers``): score every decoder layer on calibration data in one streamed pass (or
  take ``--layers``), then copy the kept layers bit-exactly under new consecutive indices and
  shorten the config (layer count and every per-layer list).
* width (``channels``): stream the layers; in each, score the MLP's intermediate channels
  from the down projection's inputs, keep the best ``mlp_ratio`` of them, and zero the dropped
  ones' down-projection columns so later layers calibrate on the pruned model (exactly
  equivalent to removing them); then write the MLP input projections' rows (and biases) and the
  down projection's columns of the kept channels, and set the config's intermediate size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch

from weightsmith.compress.moe import drop_dense_layers
from weightsmith.compress.prune.common import (
    PruneResult,
    calibration_streamer,
    passthrough,
    read_checked,
    spec_of,
)
from weightsmith.compress.prune.depth import (
    drop_from_config,
    layer_importance,
    least_important,
    renumbering,
)
from weightsmith.compress.prune.registry import PruneConfig
from weightsmith.compress.prune.wanda import ColumnNormStat
from weightsmith.compress.prune.width import (
    WIDTH_KEYS,
    channel_importance,
    channels_to_keep,
    kept_width,
)
from weightsmith.core.calibration import CalibrationLayer
from weightsmith.core.transform import WriteOptions, rewrite_checkpoint
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import Checkpoint, TensorGroup
from weightsmith.io.writer import TensorSpec


# ----------------------------------------------------------------------------- depth
def score_layers(
    ckpt: Checkpoint, cfg: PruneConfig, *, device: str, progress: bool
) -> tuple[dict[int, float], dict]:
    """``1 - cos(input, output)`` of every decoder layer on the calibration data (each
    layer's tensors are checked for NaN/Inf first: a dropped layer is read only here)."""
    streamer, info = calibration_streamer(ckpt, cfg, device=device, progress=progress)
    scores: dict[int, float] = {}
    from tqdm.auto import tqdm

    layers = ckpt.layers()
    for i in tqdm(streamer.layers(), desc="score layers", disable=not progress, leave=False):
        for n in layers.get(i, []):
            read_checked(ckpt, n)
        h_in = streamer.hidden_states()
        streamer.run_layer(i, lambda cl: None)
        scores[i] = layer_importance(h_in, streamer.hidden_states())
    return scores, info


def layers_to_drop(
    ckpt: Checkpoint, cfg: PruneConfig, *, device: str, progress: bool
) -> tuple[set[int], dict[int, float], dict[str, Any]]:
    """(layers to drop, their scores when scored, what calibration ran on), checked against
    the checkpoint's layers and its config."""
    sizes = ckpt.arch.sizes(ckpt.config)  # a multimodal model's text_config
    if ckpt.config is None or ckpt.arch.num_layers_key not in sizes:
        raise CheckpointError(f"{ckpt.root}: config.json has no {ckpt.arch.num_layers_key!r}")
    layers = list(ckpt.layers())
    n_config = int(sizes[ckpt.arch.num_layers_key])
    if len(layers) != n_config:
        raise CheckpointError(
            f"{ckpt.root}: config says {n_config} layers, checkpoint has {len(layers)}"
        )
    scores: dict[int, float] = {}
    calib_info: dict[str, Any] = {}
    if cfg.layers:
        bad = [i for i in cfg.layers if i not in layers]
        if bad:
            raise ConfigError(
                f"--layers: {ckpt.root} has no layer {bad[0]} (it has 0..{len(layers) - 1})"
            )
        drop = set(cfg.layers)
    else:
        assert cfg.drop is not None
        if cfg.drop >= len(layers):
            raise ConfigError(f"--drop {cfg.drop}: {ckpt.root} has only {len(layers)} layers")
        scores, calib_info = score_layers(ckpt, cfg, device=device, progress=progress)
        drop = set(least_important(scores, cfg.drop))
    if len(drop) >= len(layers):
        raise ConfigError(f"cannot drop all {len(layers)} layers of {ckpt.root}")
    return drop, scores, calib_info


def prune_depth(
    ckpt: Checkpoint,
    out: str | os.PathLike[str],
    cfg: PruneConfig,
    *,
    force: bool,
    max_shard_size: int,
    device: str,
    progress: bool,
) -> PruneResult:
    drop, scores, calib_info = layers_to_drop(ckpt, cfg, device=device, progress=progress)
    layers = list(ckpt.layers())
    new_index = renumbering(layers, drop)
    arch = ckpt.arch

    def rename(n: str) -> str | None:
        i = arch.layer_of(n)
        if i is None:
            return n
        return None if i in drop else arch.rename_layer(n, new_index[i])

    groups = [g for g in ckpt.groups("tensor") if rename(g.names[0]) is not None]
    edited: list[str] = []

    def patch(config: dict) -> dict:
        nested = arch.text_config if isinstance(config.get(arch.text_config), dict) else None
        if nested:  # a multimodal model: the text decoder's config loses the layers
            new, keys = drop_from_config(config[nested], arch.num_layers_key, drop)
            edited.extend(f"{nested}.{k}" for k in keys)
            return {**config, nested: new}
        config = dict(config)
        edited.extend(drop_dense_layers(config, arch, drop))  # MoE: which layers are dense
        new, keys = drop_from_config(config, arch.num_layers_key, drop)
        edited.extend(keys)
        return new

    def plan(group: TensorGroup) -> list[TensorSpec]:
        info = ckpt.info(group.names[0])
        return [TensorSpec(rename(group.names[0]), info.torch_dtype, info.shape)]

    def apply(group: TensorGroup) -> Iterator:
        n = group.names[0]
        yield passthrough(ckpt, n, rename(n))

    layer_scores = {str(i): s for i, s in scores.items()}
    result = rewrite_checkpoint(
        ckpt,
        groups,
        out,
        plan=plan,
        apply=apply,
        options=WriteOptions(max_shard_size, force, progress),
        config_patch=patch,
        provenance={
            "operation": "prune",
            "config": asdict(cfg),
            "calibration": calib_info,
            "dropped_layers": sorted(drop),
            "layer_scores": layer_scores,
        },
        description="prune layers",
    )
    r = PruneResult(**result.__dict__)
    r.extra = {
        "method": cfg.method,
        "dropped_layers": sorted(drop),
        "layers_before": len(layers),
        "layers_after": len(layers) - len(drop),
        "layer_scores": layer_scores or None,
        "config_keys_edited": edited,
        "params_before": ckpt.num_params,
        "params_after": sum(ckpt.info(g.names[0]).numel for g in groups),
        "input_size": ckpt.total_bytes,
        "output_size": result.total_size,
        "calibration": calib_info or None,
    }
    return r


# ----------------------------------------------------------------------------- width
def _mlp_layout(ckpt: Checkpoint) -> tuple[tuple[str, ...], str, str, int]:
    """The MLP input Linears, its output Linear, the config key of its width, and the width."""
    seq = ckpt.arch.sequential_linears
    if len(seq) < 2 or len(seq[-1]) != 1:
        raise ConfigError(f"{ckpt.root}: {ckpt.arch.name} has no known MLP layout to slice")
    config = ckpt.config or {}
    key = next((k for k in WIDTH_KEYS if k in config), None)
    if key is None:
        raise ConfigError(f"{ckpt.root}/config.json: no MLP width key ({', '.join(WIDTH_KEYS)})")
    width = config[key]
    if width is None and key == "n_inner":  # GPT-2: None means 4 * hidden
        width = 4 * int(config["n_embd"])
    return tuple(seq[-2]), seq[-1][0], key, int(width)


def width_slicing(ckpt: Checkpoint, width: int, key: str) -> dict[str, int]:
    """What to slice, by tensor name: the stored dim holding the MLP's channels (checked
    against every shape up front)."""
    mlp_in, mlp_out, _, _ = _mlp_layout(ckpt)
    arch = ckpt.arch
    out_dim, in_dim = (1, 0) if arch.linear_layout == "in_out" else (0, 1)  # dims of (out, in)
    slicing: dict[str, int] = {}
    for i, names in ckpt.layers().items():
        prefix = arch.layer_prefix(names[0]) or ""
        for lin in mlp_in:
            for suffix, dim in ((".weight", out_dim), (".bias", 0)):
                n = f"{prefix}{lin}{suffix}"
                if n in ckpt.tensors:
                    slicing[n] = dim
            if f"{prefix}{lin}.weight" not in ckpt.tensors:
                raise ConfigError(f"{ckpt.root}: layer {i} has no {lin}; cannot slice its MLP")
        n = f"{prefix}{mlp_out}.weight"
        if n not in ckpt.tensors:
            raise ConfigError(f"{ckpt.root}: layer {i} has no {mlp_out}; cannot slice its MLP")
        slicing[n] = in_dim
    for n, dim in slicing.items():
        shape = ckpt.info(n).shape
        if shape[dim] != width:
            raise ConfigError(
                f"{n}: dimension {dim} is {shape[dim]}, not the MLP width {width} ({key}); "
                f"fused or unusual MLPs cannot be sliced"
            )
    return slicing


def prune_width(
    ckpt: Checkpoint,
    out: str | os.PathLike[str],
    cfg: PruneConfig,
    *,
    force: bool,
    max_shard_size: int,
    device: str,
    progress: bool,
) -> PruneResult:
    assert cfg.mlp_ratio is not None
    _, mlp_out, key, width = _mlp_layout(ckpt)
    keep = kept_width(width, cfg.mlp_ratio)
    slicing = width_slicing(ckpt, width, key)
    streamer, calib_info = calibration_streamer(ckpt, cfg, device=device, progress=progress)
    kept_channels: dict[int, list[int]] = {}

    def width_layer(cl: CalibrationLayer) -> torch.Tensor:
        stats = cl.collect([mlp_out], lambda n, m: ColumnNormStat(width))
        w_down = cl.weight(mlp_out)  # (hidden, width)
        idx = channels_to_keep(channel_importance(stats[mlp_out].norm(), w_down), keep)
        dropped = torch.ones(width, dtype=torch.bool)
        dropped[idx] = False
        cl.set_weight(mlp_out, w_down.masked_fill(dropped[None, :], 0))
        return idx

    def plan(group: TensorGroup) -> list[TensorSpec]:
        specs = []
        for n in group.names:
            spec = spec_of(ckpt, n)
            if n in slicing:
                shape = list(spec.shape)
                shape[slicing[n]] = keep
                spec = TensorSpec(n, spec.dtype, tuple(shape))
            specs.append(spec)
        return specs

    def apply(group: TensorGroup) -> Iterator:
        idx = streamer.run_layer(group.layer, width_layer) if group.layer is not None else None
        if idx is not None:
            kept_channels[group.layer] = idx.tolist()
        for n in group.names:
            if n in slicing:
                yield n, read_checked(ckpt, n).index_select(slicing[n], idx).contiguous()
            else:
                yield passthrough(ckpt, n)

    def record_channels(writer) -> None:
        writer.write_json(
            "pruned_channels.json", {"kept": {str(k): v for k, v in kept_channels.items()}}
        )

    result = rewrite_checkpoint(
        ckpt,
        ckpt.groups("layer"),
        out,
        plan=plan,
        apply=apply,
        options=WriteOptions(max_shard_size, force, progress),
        config_patch=lambda config: {**config, key: keep},
        provenance={"operation": "prune", "config": asdict(cfg), "calibration": calib_info},
        description="prune channels",
        before_commit=record_channels,
    )
    r = PruneResult(**result.__dict__)
    removed = sum(ckpt.info(n).numel // width * (width - keep) for n in slicing)
    r.extra = {
        "method": cfg.method,
        "width_key": key,
        "width_before": width,
        "width_after": keep,
        "params_before": ckpt.num_params,
        "params_after": ckpt.num_params - removed,
        "input_size": ckpt.total_bytes,
        "output_size": result.total_size,
        "calibration": calib_info,
    }
    return r
