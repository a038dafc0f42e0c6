"""Extract a LoRA adapter from a fine-tune: truncated SVD of each weight delta (FT - BASE).

The options and the output are mergekit-extract-lora 0.1.5's: every ``nn.Linear`` (and, with
``embed_lora``, ``nn.Embedding``) delta ``D`` is decomposed as ``U S Vᵀ`` in float32 and cut to
``min(max_rank, #singular values > sv_epsilon)``; with ``distribute_scale`` (the default)
``A = √S Vᵀ`` and ``B = U √S``, else ``A = S Vᵀ`` and ``B = U``. Embedding deltas are
decomposed transposed (``lora_embedding_A/B``, peft's layout). Embeddings without
``embed_lora``, modules named in ``modules_to_save`` and modules that are not Linear/Embedding
(norms) are saved at full rank (``skip_undecomposable`` drops the latter instead).
``lora_alpha`` equals each module's rank, so peft's scale is 1 and ``B @ A`` is the delta.

Which modules exist and their types come from the fine-tune's architecture built on the
``meta`` device (as mergekit does); tensors are streamed: one base/fine-tune pair in memory.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from weightsmith.core.device import select_device
from weightsmith.core.transform import require_finite
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import Checkpoint
from weightsmith.io.writer import CheckpointWriter
from weightsmith.merge.lora import ADAPTER_CONFIG, PREFIX
from weightsmith.merge.lora_refs import LoraFolds

LORA, EMBEDDING, SAVE = "lora", "embedding", "save"


@dataclass(frozen=True)
class ExtractLoraConfig:
    """Options of an extraction (mergekit-extract-lora's), recorded in the provenance."""

    max_rank: int = 128
    sv_epsilon: float = 0.0
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: tuple[str, ...] = ()
    include_regexes: tuple[str, ...] = ()
    exclude_regexes: tuple[str, ...] = ()
    skip_undecomposable: bool = False
    version: int = 1


@dataclass(frozen=True)
class ModulePlan:
    """One module of the fine-tune and what the adapter stores for it."""

    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    kind: str  # LORA, EMBEDDING (decomposed transposed) or SAVE (full tensor)
    bias: bool = False


@dataclass(frozen=True)
class Decomposition:
    a: torch.Tensor
    b: torch.Tensor
    singular_values: torch.Tensor  # all of them (float32), before truncation


def decompose(
    delta: torch.Tensor,
    max_rank: int,
    *,
    sv_epsilon: float = 0.0,
    distribute_scale: bool = True,
    transpose: bool = False,
) -> Decomposition:
    """Low-rank factors ``(A, B)`` with ``B @ A`` ≈ ``delta`` (``delta.T`` with ``transpose``),
    in ``delta``'s dtype; the rank is ``min(max_rank, #s, #(s > sv_epsilon))`` (0 possible)."""
    if transpose:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    rank = min(max_rank, s.shape[0])
    if sv_epsilon > 0:
        rank = min(int((s > sv_epsilon).sum()), rank)
    if distribute_scale:
        root = torch.sqrt(s[:rank])
        a = root[:, None] * vh[:rank]
        b = u[:, :rank] * root[None, :]
    else:
        a = s[:rank, None] * vh[:rank]
        b = u[:, :rank]
    return Decomposition(a.to(delta.dtype), b.to(delta.dtype), s)


def _meta_model(ck: Checkpoint):
    """The fine-tune's architecture on the ``meta`` device (no weights allocated)."""
    import transformers

    if not ck.config or "model_type" not in ck.config:
        raise CheckpointError(f"{ck.root}: config.json has no model_type")
    try:
        config = transformers.AutoConfig.for_model(**ck.config)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, ImportError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{ck.root}: transformers cannot build this model ({msg})") from None


def plan_modules(
    base: Checkpoint, ft: Checkpoint, cfg: ExtractLoraConfig
) -> tuple[list[ModulePlan], list[str]]:
    """(modules in the fine-tune's order, the modules_to_save names for adapter_config),
    decided exactly as mergekit-extract-lora's ``plan_extraction`` (a resized vocabulary
    turns ``embed_lora`` off: both embeddings are then saved at full rank)."""
    from torch import nn

    model = _meta_model(ft)
    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()
    to_save = list(cfg.modules_to_save)
    embed_lora = cfg.embed_lora
    in_name = next((n for n, m in model.named_modules() if m is embed_in), None)
    if embed_lora and in_name is not None and f"{in_name}.weight" in base.tensors:
        shapes = [c.info(f"{in_name}.weight").shape for c in (base, ft)]
        embed_lora = tuple(shapes[0]) == tuple(shapes[1])
    plans: list[ModulePlan] = []

    def excluded(name: str) -> bool:
        return any(re.search(r, name) for r in cfg.exclude_regexes)

    def extract(name: str) -> bool:
        if cfg.include_regexes and not any(re.search(r, name) for r in cfg.include_regexes):
            return False
        return not excluded(name)

    for name, module in model.named_modules():
        weight = f"{name}.weight"
        if weight not in ft.tensors:
            continue  # no weight, or tied to another tensor (e.g. lm_head -> embed_tokens)
        bias = f"{name}.bias" in ft.tensors
        key = name.split(".")[-1]
        is_embed = module is embed_in or module is embed_out or isinstance(module, nn.Embedding)
        if not embed_lora and is_embed and not excluded(name) and key not in to_save:
            to_save.append(key)
        if name in to_save or key in to_save:
            plans.append(ModulePlan(name, SAVE, bias))
        elif not extract(name):
            continue
        elif isinstance(module, nn.Linear | nn.Embedding):
            kind = EMBEDDING if isinstance(module, nn.Embedding) else LORA
            plans.append(ModulePlan(name, kind, bias))
        elif isinstance(module, nn.Conv1d | nn.Conv2d):
            raise ConfigError(f"{name}: LoRA extraction of convolutions is not supported")
        elif not cfg.skip_undecomposable:
            if key not in to_save:
                to_save.append(key)
            plans.append(ModulePlan(name, SAVE, bias))
    return plans, to_save


def _check_pair(base: Checkpoint, ft: Checkpoint, plans: list[ModulePlan]) -> None:
    """Same architecture; every decomposed tensor in both, with one shape."""
    arch = [(c.config or {}).get("model_type") for c in (base, ft)]
    if arch[0] != arch[1]:
        raise CheckpointError(f"{base.root} is a {arch[0]} model but {ft.root} is a {arch[1]}")
    for p in plans:
        names = [f"{p.name}.weight"] + ([f"{p.name}.bias"] if p.bias else [])
        if p.kind != SAVE:
            for n in names:
                if n not in base.tensors:
                    raise CheckpointError(f"{base.root}: no tensor {n!r} (the fine-tune has it)")
                b, f = base.info(n).shape, ft.info(n).shape
                if tuple(b) != tuple(f):
                    raise CheckpointError(
                        f"{n}: shape {list(f)} in {ft.root} but {list(b)} in {base.root}"
                    )


def _read(ck: Checkpoint, name: str) -> torch.Tensor:
    return require_finite(ck.get_tensor(name), str(ck.path), name)


def _module_tensors(
    base: Checkpoint, ft: Checkpoint, p: ModulePlan, cfg: ExtractLoraConfig, device: str
) -> tuple[list[tuple[str, torch.Tensor]], int | None, torch.Tensor | None]:
    """(adapter tensors of module ``p``, its rank (None: saved), its singular values)."""
    weight = f"{p.name}.weight"
    if p.kind == SAVE:
        out = [(PREFIX + weight, _read(ft, weight))]
        if p.bias:
            out.append((f"{PREFIX}{p.name}.bias", _read(ft, f"{p.name}.bias")))
        return out, None, None
    if p.bias:
        bias_delta = _read(ft, f"{p.name}.bias") - _read(base, f"{p.name}.bias")
        if bias_delta.any():
            raise ConfigError(
                f"{p.name}: the fine-tune changed its bias, which a LoRA adapter cannot hold; "
                f"exclude the module (-e) or save it at full rank (--save-module)"
            )
    delta = _read(ft, weight).to(device) - _read(base, weight).to(device)
    d = decompose(
        delta,
        cfg.max_rank,
        sv_epsilon=cfg.sv_epsilon,
        distribute_scale=cfg.distribute_scale,
        transpose=p.kind == EMBEDDING,
    )
    rank = d.a.shape[0]
    if rank == 0:
        return [], 0, d.singular_values.cpu()
    kind, suffix = ("lora_embedding", "") if p.kind == EMBEDDING else ("lora", ".weight")
    return (
        [
            (f"{PREFIX}{p.name}.{kind}_A{suffix}", d.a.cpu().contiguous()),
            (f"{PREFIX}{p.name}.{kind}_B{suffix}", d.b.cpu().contiguous()),
        ],
        rank,
        d.singular_values.cpu(),
    )


def adapter_config(
    base: Checkpoint, ranks: dict[str, int], modules_to_save: list[str]
) -> dict[str, object]:
    """mergekit-extract-lora's adapter_config.json: r = the largest rank, lora_alpha = r,
    every module of another rank in rank_pattern and alpha_pattern (so each scale is 1)."""
    max_rank = max(ranks.values(), default=1)
    other = {k: v for k, v in ranks.items() if v != max_rank}
    return {
        "base_model_name_or_path": str(base.root.resolve()),
        "peft_type": "LORA",
        "use_rslora": False,
        "target_modules": sorted({k.split(".")[-1] for k in ranks}),
        "modules_to_save": modules_to_save,
        "task_type": "CAUSAL_LM",
        "r": max_rank,
        "lora_alpha": max_rank,
        "rank_pattern": other,
        "alpha_pattern": other,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


@dataclass
class ExtractResult:
    out: str
    lora_modules: int
    saved_modules: int
    dropped_modules: list[str]
    max_rank: int
    tensors: int
    total_size: int
    wall_s: float
    retained_energy: float  # Σ kept s² / Σ s² over all decomposed deltas (1.0: exact)


def _stream_modules(
    base: Checkpoint, ft: Checkpoint, plans: list[ModulePlan], cfg: ExtractLoraConfig,
    device: str, progress: bool,
) -> Iterator[tuple[ModulePlan, list[tuple[str, torch.Tensor]], int | None, float, float]]:  # fmt: skip
    for p in tqdm(plans, desc="extract lora", unit="module", disable=not progress, leave=False):
        tensors, rank, s = _module_tensors(base, ft, p, cfg, device)
        kept = total = 0.0
        if s is not None:
            sq = s.double() ** 2
            kept, total = float(sq[: rank or 0].sum()), float(sq.sum())
        yield p, tensors, rank, kept, total


def extract_lora(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: ExtractLoraConfig,
    *,
    device: str = "cpu",
    force: bool = False,
    progress: bool = True,
    lora_merge_cache: str | os.PathLike[str] | None = None,
    lora_merge_dtype: str | None = None,
) -> ExtractResult:
    """Write the PEFT adapter that turns ``base`` into (a rank-``cfg.max_rank`` approximation
    of) ``finetuned`` to ``out`` (atomically: nothing appears there on error). Either may be
    ``MODEL+ADAPTER``: the model with that LoRA adapter folded in (:mod:`.lora_refs`), e.g. to
    re-extract an adapter at a lower rank."""
    _check_options(cfg, device)
    device = str(select_device(device))  # auto -> cuda/cpu
    cache = Path(lora_merge_cache) if lora_merge_cache else None
    folds = LoraFolds(Path(out).absolute(), force, cache, lora_merge_dtype, device, progress)
    try:
        with folds.open(str(base)) as bk, folds.open(str(finetuned)) as fk:
            return _extract(bk, fk, out, cfg, device, force, progress, folds.record())
    finally:
        folds.close()


def _extract(
    bk: Checkpoint,
    fk: Checkpoint,
    out: str | os.PathLike[str],
    cfg: ExtractLoraConfig,
    device: str,
    force: bool,
    progress: bool,
    folds: list[dict],
) -> ExtractResult:
    start = time.perf_counter()
    plans, to_save = plan_modules(bk, fk, cfg)
    _check_pair(bk, fk, plans)
    if not any(p.kind != SAVE for p in plans):
        raise ConfigError("no Linear or Embedding module left to decompose")
    ranks: dict[str, int] = {}
    dropped: list[str] = []
    kept = total = 0.0
    with CheckpointWriter(
        out, max_shard_size=1 << 62, force=force, inputs=[bk.path, fk.path],
        weights_name="adapter_model",
    ) as writer:  # fmt: skip
        for p, tensors, rank, k, t in _stream_modules(bk, fk, plans, cfg, device, progress):
            for name, tensor in tensors:
                writer.write(name, tensor)
            if rank == 0:
                dropped.append(p.name)
            elif rank is not None:
                ranks[p.name] = rank
            kept, total = kept + k, total + t
        if not ranks:
            raise ConfigError(f"every delta is below --sv-epsilon {cfg.sv_epsilon}")
        writer.write_json(ADAPTER_CONFIG, adapter_config(bk, ranks, to_save))
        summary = writer.commit(
            {
                "operation": "extract_lora",
                "config": asdict(cfg),
                "output_kind": "peft-adapter",
                "inputs": [{"path": str(c.path), "fingerprint": c.fingerprint()} for c in (bk, fk)],
                **({"lora_folds": folds} if folds else {}),
            }
        )
    return ExtractResult(
        out=summary.out,
        lora_modules=len(ranks),
        saved_modules=sum(p.kind == SAVE for p in plans),
        dropped_modules=dropped,
        max_rank=max(ranks.values()),
        tensors=summary.tensors,
        total_size=summary.total_size,
        wall_s=round(time.perf_counter() - start, 3),
        retained_energy=kept / total if total > 0 else 1.0,
    )


def _check_options(cfg: ExtractLoraConfig, device: str) -> None:
    if cfg.max_rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {cfg.max_rank}")
    if not cfg.sv_epsilon >= 0 or cfg.sv_epsilon == float("inf"):
        raise ConfigError(f"--sv-epsilon must be a finite number >= 0, got {cfg.sv_epsilon}")
    for r in (*cfg.include_regexes, *cfg.exclude_regexes):
        try:
            re.compile(r)
        except re.error as e:
            raise ConfigError(f"invalid regex {r!r}: {e}") from None
    select_device(device)  # an absent device is refused


__all__ = ["ExtractLoraConfig", "ExtractResult", "decompose", "extract_lora", "plan_modules"]
