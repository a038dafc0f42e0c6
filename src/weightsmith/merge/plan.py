"""Turn a recipe into one job per output tensor, checking the inputs on headers alone.

Checks before any data is read: same architecture family, same tensor names and shapes
(vocabulary rows aside), layer ranges that exist; different vocabulary sizes need a
vocabulary (``tokenizer_source`` / ``tokenizer:``), whose rows merge/vocab.py maps by token. Parameters are resolved per tensor with mergekit's rules: depth
``t`` = layer / (layers − 1) within each slice, 0 for tensors outside the layers (as mergekit 0.1.5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import Checkpoint
from weightsmith.merge.methods import get_method
from weightsmith.merge.methods.base import MergeMethod, TensorParams, with_defaults
from weightsmith.merge.params import lookup
from weightsmith.merge.recipe import PASSTHROUGH, InputSlice, MergeRecipe, OutputSlice

MAX_LISTED = 3
# Depth at which embeddings, the final norm and lm_head read gradients. mergekit 0.1.5
# evaluates all of them at t = 0 (older mergekit used t = 1 for the norm and head).
NON_LAYER_T = 0.0


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its inputs (base first when the method has one) and parameters."""

    key: str
    names: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...]  # (model path, tensor name)
    shape: tuple[int, ...]
    params: TensorParams | None = None  # None: copy inputs[0] (times ``scale``)
    method: str = ""
    scale: float = 1.0
    vocab: bool = False  # rows re-indexed by the merged vocabulary (merge/vocab.py) first
    # a merge group (merge/expert_groups.py): the per-expert jobs whose outputs, concatenated
    # flat in this order, are this job's (fused) output; ``inputs`` are the first member's
    members: tuple[TensorJob, ...] = ()

    @property
    def out_name(self) -> str:
        return self.names[0]

    @property
    def outputs(self) -> tuple[TensorJob, ...]:
        """The jobs whose tensors this job writes: its members, or itself."""
        return self.members or (self,)


@dataclass
class MergePlan:
    jobs: list[TensorJob]
    reference: str  # model whose config and tokenizer the output takes
    num_layers: int
    layer_sources: list[tuple[str, int]] = field(default_factory=list)  # per output layer
    notes: list[str] = field(default_factory=list)


def build_plan(
    recipe: MergeRecipe,
    ckpts: Mapping[str, Checkpoint],
    final_from: str | None = None,
    vocab_size: int | None = None,
) -> MergePlan:
    """Jobs for every output tensor of ``recipe`` (model references already resolved);
    ``vocab_size``: the merged vocabulary's rows when the recipe asks for one."""
    _check_families(ckpts)
    if recipe.slices:
        multimodal = [c for c in ckpts.values() if c.arch.multimodal]
        if multimodal:  # the layer lists would have to be edited inside text_config
            raise ConfigError(
                f"{multimodal[0].path}: slices (layer ranges) of a multimodal model "
                f"({multimodal[0].arch.name}) are not supported; merge whole models instead"
            )
        plan = _plan_slices(recipe, ckpts, final_from)
    else:
        plan = _plan_models(recipe, ckpts)
    if vocab_size is not None:
        plan.jobs = _vocab_jobs(plan.jobs, ckpts[plan.reference], vocab_size)
    return plan


def vocab_tensors(ckpt: Checkpoint) -> set[str]:
    """The tensors indexed by token id (embeddings, lm_head) of ``ckpt``'s architecture."""
    arch = ckpt.arch
    return {n for n in [*arch.embed, arch.lm_head] if n and n in ckpt.tensors}


def _vocab_jobs(jobs: list[TensorJob], ref: Checkpoint, rows: int) -> list[TensorJob]:
    names = vocab_tensors(ref)
    return [
        replace(j, vocab=True, shape=(rows, *j.shape[1:])) if j.out_name in names else j
        for j in jobs
    ]


# ---------------------------------------------------------------------- models mode
def _plan_models(recipe: MergeRecipe, ckpts: Mapping[str, Checkpoint]) -> MergePlan:
    method = get_method(recipe.merge_method) if recipe.merge_method != PASSTHROUGH else None
    if method is None:
        raise ConfigError("passthrough needs 'slices' (layer ranges), not 'models'")
    order, base = _input_order(method, recipe.base_model, [m.model for m in recipe.models])
    per_model = {m.model: m.parameters for m in recipe.models}
    ref = ckpts[base or order[0]]
    _check_same_tensors(ref, [ckpts[p] for p in order], recipe.vocabulary is not None)
    layers = ref.num_layers
    jobs = []
    for name, info in ref.tensors.items():
        layer = ref.arch.layer_of(name)
        t = _depth(layer, layers) if layer is not None else NON_LAYER_T
        params = _resolve(method, name, t, order, base, per_model, {}, recipe.parameters,
                          ref.arch.merge_name(name))  # fmt: skip
        jobs.append(
            TensorJob(
                name,
                (name,),
                tuple((p, name) for p in order),
                info.shape,
                params,
                method.name,
            )
        )
    return MergePlan(jobs, base or order[0], layers)


def _input_order(
    method: MergeMethod, base: str | None, models: list[str]
) -> tuple[list[str], str | None]:
    if method.needs_base or (method.optional_base and base):
        if not base:
            raise ConfigError(f"{method.name} needs a base model (base_model / --base)")
        return [base, *[m for m in models if m != base]], base
    if method.base_as_input and base and base not in models:
        return [*models, base], None  # mergekit adds the base as the last input
    return list(models), None


def _resolve(
    method: MergeMethod,
    tensor: str,
    t: float,
    order: list[str],
    base: str | None,
    per_model: Mapping[str, Mapping[str, Any]],
    slice_params: Mapping[str, Any],
    global_params: Mapping[str, Any],
    lookup_name: str | None = None,
) -> TensorParams:
    """``tensor``'s parameters, filters matched against ``lookup_name`` (the name mergekit
    gives it: Mixtral's per-expert ``w1`` is under ``mlp.experts.gate_up_proj``) or ``tensor``."""
    key = lookup_name or tensor
    g = {p.name: lookup(p.name, key, t, slice_params, global_params) for p in method.global_params}
    models = tuple(
        {
            p.name: lookup(p.name, key, t, per_model.get(m), slice_params, global_params)
            for p in method.model_params
        }
        for m in order
        if m != base
    )
    names = tuple(m for m in order if m != base)
    params = TensorParams(
        tensor, g, models if method.model_params else (), names, has_base=base is not None
    )
    try:
        params = with_defaults(method, params, len(order))
    except ConfigError as e:
        raise ConfigError(f"tensor {tensor!r}: {e}") from None
    method.validate(params)  # its messages name the tensor
    return params


def _depth(layer: int, num_layers: int) -> float:
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


# ---------------------------------------------------------------------- slices mode
def _plan_slices(
    recipe: MergeRecipe, ckpts: Mapping[str, Checkpoint], final_from: str | None
) -> MergePlan:
    passthrough = recipe.merge_method == PASSTHROUGH
    method = None if passthrough else get_method(recipe.merge_method)
    first, last = recipe.slices[0], recipe.slices[-1]
    ref = ckpts[first.sources[0].model]
    jobs: list[TensorJob] = []
    layer_sources: list[tuple[str, int]] = []
    out_layer = 0
    pre = [n for n in ref.tensors if n in ref.arch.embed]
    post_ref = ckpts[final_from] if final_from else ckpts[last.sources[0].model]
    post = [
        n for n in post_ref.tensors if post_ref.arch.layer_of(n) is None and n not in ref.arch.embed
    ]
    for name in pre:
        jobs.append(_slice_job(recipe, method, first, name, name, NON_LAYER_T, ckpts, None))
    for k, sl in enumerate(recipe.slices):
        for src in sl.sources:
            n_layers = ckpts[src.model].num_layers
            if src.layer_range[1] > n_layers:
                raise ConfigError(
                    f"slices[{k}]: layer_range {list(src.layer_range)} is past the "
                    f"{n_layers} layers of {src.model}"
                )
        count = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for idx in range(count):
            t = idx / (count - 1) if count > 1 else 1.0
            src0 = sl.sources[0]
            ck0 = ckpts[src0.model]
            in_layer = src0.layer_range[0] + idx
            layer_sources.append((src0.model, in_layer))
            for name in ck0.layers().get(in_layer, []):
                out_name = ck0.arch.rename_layer(name, out_layer)
                jobs.append(_slice_job(recipe, method, sl, name, out_name, t, ckpts, idx))
            out_layer += 1
    for name in post:
        src_slice = last
        if final_from:
            src_slice = OutputSlice((InputSlice(final_from, (0, 1)),))
        jobs.append(_slice_job(recipe, method, src_slice, name, name, NON_LAYER_T, ckpts, None))
    _check_output_shapes(jobs, ref, ckpts)
    return MergePlan(jobs, first.sources[0].model, out_layer, layer_sources)


def _check_output_shapes(
    jobs: list[TensorJob], ref: Checkpoint, ckpts: Mapping[str, Checkpoint]
) -> None:
    """Every tensor taken from another model must have the shape the output config (the
    reference's, with its layer count changed) gives it: the reference's own tensor of the same
    role. Configs with per-layer lists (layers of different shapes by design) are left alone."""
    n_ref = ref.num_layers
    config = ref.config or {}
    if any(isinstance(v, list) and len(v) == n_ref and n_ref > 1 for v in config.values()):
        return
    for job in jobs:
        model, name = job.inputs[0]
        if ckpts[model] is ref:
            continue
        layer = ckpts[model].arch.layer_of(name)
        role = name if layer is None else ref.arch.rename_layer(name, 0)
        expected = ref.tensors.get(role)
        if expected is None or tuple(expected.shape) != tuple(job.shape):
            want = "has no such tensor" if expected is None else f"makes it {list(expected.shape)}"
            raise CheckpointError(
                f"tensor {job.out_name!r} (from {model}) is {list(job.shape)}, but the output "
                f"config (from {ref.path}) {want}: the models have different shapes"
            )


def _slice_job(
    recipe: MergeRecipe,
    method: MergeMethod | None,
    sl: OutputSlice,
    name: str,
    out_name: str,
    t: float,
    ckpts: Mapping[str, Checkpoint],
    layer_offset: int | None,
) -> TensorJob:
    def source_name(src: InputSlice) -> str:
        if layer_offset is None:
            return name
        ck = ckpts[src.model]
        return ck.arch.rename_layer(name, src.layer_range[0] + layer_offset)

    base = sl.base_model or recipe.base_model
    paths = [s.model for s in sl.sources]
    if method is None:  # passthrough: one source, optional scale
        src = sl.sources[0]
        tensor = source_name(src)
        info = _info(ckpts[src.model], tensor)
        key = ckpts[src.model].arch.merge_name(out_name)
        scale = lookup("scale", key, t, src.parameters, sl.parameters, recipe.parameters)
        return TensorJob(
            out_name,
            (out_name,),
            ((src.model, tensor),),
            info.shape,
            scale=1.0 if scale is None else float(scale),
        )
    if base and base not in paths:
        raise ConfigError(f"base model {base} is not among the sources of a slice")
    order, base = _input_order(method, base, paths)
    by_model = {s.model: s for s in sl.sources}
    inputs = tuple((m, source_name(by_model[m])) for m in order)
    infos = [_info(ckpts[m], n) for m, n in inputs]
    shapes = {i.shape for i in infos}
    if recipe.vocabulary is not None and name in vocab_tensors(ckpts[inputs[0][0]]):
        shapes = {i.shape[1:] for i in infos}
    if len(shapes) != 1:
        listed = ", ".join(f"{m}: {list(i.shape)}" for (m, _), i in zip(inputs, infos, strict=True))
        raise CheckpointError(f"tensor {out_name!r}: shapes differ ({listed})")
    per_model = {s.model: s.parameters for s in sl.sources}
    params = _resolve(method, out_name, t, order, base, per_model, sl.parameters, recipe.parameters,
                      ckpts[inputs[0][0]].arch.merge_name(out_name))  # fmt: skip
    return TensorJob(out_name, (out_name,), inputs, infos[0].shape, params, method.name)


def _info(ckpt: Checkpoint, name: str):
    info = ckpt.tensors.get(name)
    if info is None:
        raise CheckpointError(f"{ckpt.path}: no tensor named {name!r}")
    return info


# ---------------------------------------------------------------------- checks
def _check_families(ckpts: Mapping[str, Checkpoint]) -> None:
    families = {p: c.arch.name for p, c in ckpts.items()}
    if len(set(families.values())) > 1:
        listed = ", ".join(f"{p} is {a}" for p, a in families.items())
        raise CheckpointError(f"models are of different architecture families ({listed})")


def _check_same_tensors(ref: Checkpoint, ckpts: list[Checkpoint], vocabulary: bool) -> None:
    """Same names and shapes everywhere (vocabulary rows may differ when ``vocabulary``)."""
    problems: list[str] = []
    vocab = set(ref.arch.embed) | ({ref.arch.lm_head} if ref.arch.lm_head else set())
    mismatched_vocab: list[str] = []
    for ck in ckpts:
        if ck is ref:
            continue
        missing = [n for n in ref.tensors if n not in ck.tensors]
        extra = [n for n in ck.tensors if n not in ref.tensors]
        problems += [f"{ck.path} lacks {n!r}" for n in missing]
        problems += [f"{ck.path} has extra {n!r}" for n in extra]
        for name, info in ref.tensors.items():
            other = ck.tensors.get(name)
            if other is None or other.shape == info.shape:
                continue
            same_cols = other.shape[1:] == info.shape[1:] and len(info.shape) >= 1
            if name in vocab and same_cols:
                mismatched_vocab.append(
                    f"{name}: {ref.path} has {info.shape[0]} rows, {ck.path} {other.shape[0]}"
                )
            else:
                problems.append(
                    f"{name!r} is {list(other.shape)} in {ck.path} but "
                    f"{list(info.shape)} in {ref.path}"
                )
    if problems:
        more = f" (+{len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise CheckpointError(
            "models do not have the same tensors: " + "; ".join(problems[:MAX_LISTED]) + more
        )
    if mismatched_vocab and not vocabulary:
        raise CheckpointError(
            f"vocabulary sizes differ ({mismatched_vocab[0]}); pass --tokenizer-source base "
            "(or union, or a model) to merge embedding rows by token"
        )
