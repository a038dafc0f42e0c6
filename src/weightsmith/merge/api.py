"""``merge(recipe, out)``: the one library call behind every ``merge`` command."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from weightsmith.core.device import select_device
from weightsmith.core.parallel import compute_pool
from weightsmith.core.streaming import RawTensor, StreamResult
from weightsmith.core.transform import (
    WriteOptions,
    checked_copy,
    dtype_patch,
    rewrite_checkpoint,
)
from weightsmith.errors import ConfigError
from weightsmith.io.architectures import require_described
from weightsmith.io.dtypes import config_dtype_name, parse_user_dtype
from weightsmith.io.hub import parse_hub_id, resolve_model_reference
from weightsmith.io.reader import Checkpoint
from weightsmith.io.support_files import TOKENIZER_FILES
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec
from weightsmith.merge.card import model_card
from weightsmith.merge.engine import (
    DEFAULT_CHUNK_ELEMENTS,
    job_spec,
    produce,
    split_bytes,
    with_compute_dtype,
)
from weightsmith.merge.expert_groups import group_expert_jobs
from weightsmith.merge.lookahead import Lookahead, ahead_eligible, early_stream, input_bytes
from weightsmith.merge.lora_refs import LoraFolds, resolve_reference
from weightsmith.merge.methods import get_method, sphere_native
from weightsmith.merge.plan import MergePlan, TensorJob, build_plan
from weightsmith.merge.recipe import PASSTHROUGH, MergeRecipe
from weightsmith.merge.vocab import VocabMerge, output_tokenizer, plan_vocabulary

RECIPE_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"


def resolve_model(
    ref: str, models_dir: str | os.PathLike[str] | None = None, *, adapter: bool = False
) -> str:
    """A recipe's model reference as an absolute local path (``models_dir`` first), else a
    hub id ``org/name[@revision]`` from the Hugging Face cache (:mod:`weightsmith.io.hub`).
    ``adapter``: ``ref`` names a PEFT adapter (the ``ADAPTER`` of ``MODEL+ADAPTER``)."""
    p = Path(ref).expanduser()
    candidates = [p] if p.is_absolute() else []
    if not p.is_absolute():
        if models_dir is not None:
            candidates.append(Path(models_dir) / p)
        candidates.append(Path.cwd() / p)
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    if parse_hub_id(ref) is not None:
        return resolve_model_reference(ref, adapter=adapter)
    looked = ", ".join(str(c) for c in candidates)
    what = "adapter" if adapter else "model"
    kind = "PEFT adapter" if adapter else "checkpoint"
    raise ConfigError(
        f"{what} {ref!r} not found (looked at {looked}); recipes take local {kind} "
        "folders (--models-dir for relative names) or hub ids org/name[@revision]"
    )


def reference_resolver(models_dir: str | os.PathLike[str] | None) -> Callable[[str], str]:
    """A recipe's model reference -> absolute paths (``MODEL+ADAPTER``: both halves)."""
    return lambda ref: resolve_reference(
        ref,
        lambda m: resolve_model(m, models_dir),
        lambda a: resolve_model(a, models_dir, adapter=True),
    )


def merge(
    recipe: MergeRecipe,
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    device: str = "cpu",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool = True,
    models_dir: str | os.PathLike[str] | None = None,
    final_from: str | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    allow_pickle: bool = False,
    compute_dtype: str | None = None,
    lora_merge_cache: str | os.PathLike[str] | None = None,
    lora_merge_dtype: str | None = None,
) -> StreamResult:
    """Run ``recipe`` and write the merged checkpoint to ``out`` (atomically).

    ``dtype`` overrides the recipe's output dtype (default: each tensor keeps its base/first
    model's dtype). A ``MODEL+ADAPTER`` reference is the model with the PEFT LoRA adapter
    folded in (:mod:`weightsmith.merge.lora_refs`: kept in ``lora_merge_cache`` when given,
    in ``lora_merge_dtype`` when given). The arithmetic runs on ``device`` in mergekit's dtype (the recipe's
    ``dtype``, else the inputs'); ``compute_dtype`` (or the recipe's) overrides it, and
    ``"float32"`` keeps weightsmith's exact float32 arithmetic. ``final_from`` (slices only) names the
    model whose final norm and lm_head are used instead of the last slice's. Every parameter
    value is checked (finite, in range) before any checkpoint is opened, every input tensor and
    every output block is checked for NaN/Inf.
    """
    recipe = recipe.validate()
    if dtype is not None:
        recipe = _replace_dtype(recipe, config_dtype_name(parse_user_dtype(dtype)))
    if compute_dtype is not None:
        name = config_dtype_name(parse_user_dtype(compute_dtype))
        recipe = replace(recipe, compute_dtype=name).validate()
    device = str(select_device(device))  # auto -> cuda/cpu; an absent device is refused
    if lora_merge_dtype is not None:
        lora_merge_dtype = config_dtype_name(parse_user_dtype(lora_merge_dtype))
    resolve = reference_resolver(models_dir)
    recorded = recipe.resolved(resolve)
    final_ref = resolve(final_from) if final_from is not None else None
    options = WriteOptions(max_shard_size, force, progress)
    folds = LoraFolds(
        Path(out).absolute(), force, Path(lora_merge_cache) if lora_merge_cache else None,
        lora_merge_dtype, device, progress,
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.callback(folds.close)
        recipe, final_from = recorded, final_ref
        ckpts: dict[str, Checkpoint] = {}
        for ref in [*recipe.referenced_models(), *([final_from] if final_from else [])]:
            if ref not in ckpts:
                ckpts[ref] = stack.enter_context(folds.open(ref, allow_pickle))
                require_described(ckpts[ref].arch, f"{ref}: merge")
                _refuse_quantized(ckpts[ref], ref)
        vocab = plan_vocabulary(recipe, ckpts)
        plan = build_plan(recipe, ckpts, final_from, vocab.vocabulary.size if vocab else None)
        passthrough = recipe.merge_method == PASSTHROUGH
        method = None if passthrough else get_method(recipe.merge_method)
        plan.jobs = group_expert_jobs(plan.jobs, ckpts, method)
        plan.jobs = with_compute_dtype(plan.jobs, ckpts, recipe.compute_dtype or recipe.dtype)
        stack.enter_context(compute_pool(device=device))
        stack.callback(sphere_native.release_buffers)
        sources = [stack.enter_context(s) for r, c in ckpts.items() for s in folds.sources(r, c)]
        run = _Run(plan, ckpts, options, device, chunk_elements, vocab)
        return _run_plan(recipe, run, out, _Record(recorded, final_ref, sources, folds.record()))


def _refuse_quantized(ckpt: Checkpoint, ref: str) -> None:
    """Packed quantized tensors (gpt-oss's MXFP4 ``*_blocks``, compressed-tensors' packed ints)
    do not merge as numbers: refuse them rather than write a wrong model."""
    qc = (ckpt.config or {}).get("quantization_config")
    if isinstance(qc, dict):
        raise ConfigError(
            f"{ref}: is quantized ({qc.get('quant_method', '?')}); merge unquantized weights "
            "(load it in transformers dequantized, e.g. Mxfp4Config(dequantize=True) for "
            "gpt-oss, and save_pretrained)"
        )


@dataclass
class _Record:
    """What the output records: the recipe as given (``MODEL+ADAPTER`` references kept), the
    inputs and the adapters folded."""

    recipe: MergeRecipe
    final_from: str | None
    sources: list[Checkpoint]
    lora_folds: list[dict]


@dataclass
class _Run:
    plan: MergePlan
    ckpts: dict[str, Checkpoint]
    options: WriteOptions
    device: str
    chunk_elements: int
    vocab: VocabMerge | None


def _run_plan(
    recipe: MergeRecipe, run: _Run, out: str | os.PathLike[str], record: _Record
) -> StreamResult:
    """Stream every job of the plan into ``out`` and report what was merged."""
    plan, ckpts, device, chunk_elements = run.plan, run.ckpts, run.device, run.chunk_elements
    tokenizer = output_tokenizer(recipe, run.vocab, plan.reference)
    out_dtype = parse_user_dtype(recipe.output_dtype) if recipe.output_dtype else None
    specs = {o.out_name: job_spec(o, ckpts, out_dtype) for j in plan.jobs for o in j.outputs}
    stats: dict = {}
    ahead = _lookahead(run, specs)

    def apply(job: TensorJob):
        if job.members:  # a merge group: one fused merge, written back member by member
            yield from _group_outputs(job, run, [specs[m.out_name] for m in job.members])
            return
        spec = specs[job.out_name]
        if _shared_outside_text(job, ckpts, spec.dtype):
            stats.setdefault("copied_shared", []).append(job.out_name)
            yield checked_copy(ckpts[job.inputs[0][0]], job.inputs[0][1], job.out_name)
            return
        chunks = lambda: produce(  # noqa: E731
            job,
            ckpts,
            spec,
            device=device,
            chunk_elements=chunk_elements,
            stats=stats,
            vocab=run.vocab,
            stream=ahead.take(job),
            on_stream=ahead.starter(job),
        )
        yield job.out_name, RawTensor(spec, chunks)

    ref = ckpts[plan.reference]

    try:
        result = rewrite_checkpoint(
            ref,
            plan.jobs,
            out,
            plan=lambda job: [specs[o.out_name] for o in job.outputs],
            apply=apply,
            options=run.options,
            sources=record.sources,
            config_patch=_config_patch(ckpts, plan, recipe, out_dtype, run.vocab),
            support_skip=TOKENIZER_FILES if tokenizer else (),
            description=f"merge {recipe.merge_method}",
            provenance={
                "operation": "merge",
                "method": recipe.merge_method,
                "recipe": record.recipe.record(),
                "config": {"device": device, "chunk_elements": chunk_elements},
                **({"lora_folds": record.lora_folds} if record.lora_folds else {}),
            },
            before_commit=_support_files(record, plan, tokenizer),
        )
    finally:
        ahead.close()
    result.extra.update(
        {
            "method": recipe.merge_method,
            "tensors_merged": sum(len(j.outputs) for j in plan.jobs if j.params is not None)
            - len(stats.get("copied_shared", [])),
            "tensors_copied": sum(1 for j in plan.jobs if j.params is None)
            + len(stats.get("copied_shared", [])),
            "num_layers": plan.num_layers,
            **({"lora_folds": record.lora_folds} if record.lora_folds else {}),
            **stats,
        }
    )
    return result


def _support_files(
    record: _Record, plan: MergePlan, tokenizer: dict
) -> Callable[[CheckpointWriter], None]:
    """``before_commit``: the recipe as given, the model card and the merged tokenizer."""
    recipe, final_from = record.recipe, record.final_from

    def before_commit(writer: CheckpointWriter) -> None:
        note = ""
        if final_from and recipe.slices and final_from != recipe.slices[-1].sources[0].model:
            note = (
                f"# weightsmith: final norm / lm_head taken from {final_from} "
                "(mergekit would take them from the last slice)\n"
            )
        writer.write_text(RECIPE_FILE, note + recipe.to_yaml())
        writer.write_text(CARD_FILE, model_card(recipe, plan))
        for name, data in tokenizer.items():
            writer.write_bytes(name, data)

    return before_commit


def _lookahead(run: _Run, specs: Mapping[str, TensorSpec]) -> Lookahead:
    """The plan's jobs with the next one's statistics computed beside each one's output."""
    ckpts, device = run.ckpts, run.device
    return Lookahead(
        run.plan.jobs,
        make=lambda job: early_stream(
            job, ckpts, specs[job.out_name], device=device, chunk_elements=run.chunk_elements
        ),
        eligible=lambda job: (
            ahead_eligible(job, ckpts, device)
            and not _shared_outside_text(job, ckpts, specs[job.out_name].dtype)
        ),
        sizes=lambda job: input_bytes(job, ckpts),
    )


def _group_outputs(job: TensorJob, run: _Run, outs: list[TensorSpec]):
    """A merge group's members (``outs``): the fused tensor merged once, its bytes cut into
    the members in order, as the writer consumes them."""
    fused = TensorSpec(job.out_name, outs[0].dtype, job.shape)
    chunks = produce(job, run.ckpts, fused, device=run.device, chunk_elements=run.chunk_elements)
    pieces = split_bytes(chunks, [o.nbytes for o in outs])
    for o, piece in zip(outs, pieces, strict=True):
        yield o.name, RawTensor(o, lambda piece=piece: piece)


def _shared_outside_text(
    job: TensorJob, ckpts: Mapping[str, Checkpoint], dtype: torch.dtype
) -> bool:
    """Whether ``job`` is a multimodal model's tensor outside the text decoder (vision tower,
    projector) that every input holds byte for byte: it is copied as stored. Tensors that
    differ are merged like any other, tensor-wise, as mergekit does."""
    first, name = ckpts[job.inputs[0][0]], job.inputs[0][1]
    if job.params is None or not first.arch.multimodal or first.arch.in_text_decoder(name):
        return False
    if first.info(name).torch_dtype != dtype or job.vocab:
        return False
    ref = first.get_tensor(name).reshape(-1).view(torch.uint8)
    for model, other in job.inputs[1:]:
        ck = ckpts[model]
        if ck.info(other).torch_dtype != dtype or ck.info(other).shape != first.info(name).shape:
            return False
        if not torch.equal(ck.get_tensor(other).reshape(-1).view(torch.uint8), ref):
            return False
    return True


def _replace_dtype(recipe: MergeRecipe, name: str) -> MergeRecipe:
    return replace(recipe, out_dtype=name)


def _config_patch(ckpts: Mapping[str, Checkpoint], plan: MergePlan, recipe, out_dtype, vocab):
    ref = ckpts[plan.reference]
    old_layers = ref.num_layers
    layers_key = ref.arch.num_layers_key

    def patch(config: dict) -> dict:
        if out_dtype is not None:
            config = dtype_patch(config_dtype_name(out_dtype))(config)
        if vocab is not None:
            nested = config.get("text_config")
            target = nested if "vocab_size" not in config and isinstance(nested, dict) else config
            target["vocab_size"] = vocab.vocabulary.size
        if recipe.slices:
            configs = {m: ckpts[m].config or {} for m, _ in plan.layer_sources}
            for key, value in list(config.items()):
                if isinstance(value, list) and len(value) == old_layers and key != "architectures":
                    config[key] = [
                        configs.get(m, {}).get(key, value)[i] for m, i in plan.layer_sources
                    ]
            config[layers_key] = plan.num_layers
        return config

    return patch
