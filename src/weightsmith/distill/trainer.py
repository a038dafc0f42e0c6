"""``distill``: train a student from a teacher's logits (online or cached) or its generations.

One loop for every mode: full or LoRA/QLoRA student; teacher logits online, from a top-k cache,
or none (CE only, seqkd). Each optimizer step draws ``batch_size × grad_accum`` sequences,
counts their completion tokens over all micro-batches and processes first, and divides every
micro-batch's summed loss by that global count (see :mod:`weightsmith.distill.losses`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from weightsmith.core.report import peak_rss_bytes
from weightsmith.distill.cache import TeacherCache, _device
from weightsmith.distill.config import DistillConfig
from weightsmith.distill.data import (
    Example,
    Records,
    collate,
    data_fingerprint,
    read_records,
    tokenize_records,
)
from weightsmith.distill.distributed import (
    ProcessGroup,
    all_reduce_grads,
    all_reduce_sum,
    barrier,
    init_process_group,
)
from weightsmith.distill.losses import (
    IGNORE_INDEX,
    distillation_loss,
    forward_kl,
    shift_for_next_token,
)
from weightsmith.distill.models import (
    load_model,
    load_tokenizer,
    logits_width,
    lora_deltas,
    wrap_lora,
)
from weightsmith.distill.save import full_weights, merged_weights, write_adapter, write_student
from weightsmith.distill.schedule import lr_factor
from weightsmith.distill.seqkd import generate_pairs, prompts_of
from weightsmith.distill.vocab import plan_vocab, tokenizer_hash
from weightsmith.errors import ConfigError
from weightsmith.io.paths import check_output_location
from weightsmith.io.reader import open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE


@dataclass
class DistillResult:
    """What a run did and cost; ``eval_*`` are held-out CE/perplexity/KL when asked."""

    out: str
    steps: int
    train_tokens: int  # completion positions trained on (all processes)
    tokens_per_s: float  # input tokens through the student per second (all processes)
    wall_s: float
    peak_rss: int
    losses: list[float]
    eval_before: dict | None = None
    eval_after: dict | None = None
    notes: list[str] = field(default_factory=list)
    world_size: int = 1
    train_peak_rss: int = 0  # peak RSS through loading and training, before eval and saving

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Teacher:
    """Where the teacher signal comes from in this run."""

    model: object | None = None
    cache: TeacherCache | None = None
    common: int | None = None  # logits compared over [..., :common]


def distill(
    teacher: str | os.PathLike[str] | None,
    student: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: DistillConfig,
    *,
    teacher_cache: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    ref: str | os.PathLike[str] | None = None,
    ref_cache: str | os.PathLike[str] | None = None,
) -> DistillResult:
    """Train ``student`` on ``data`` with the teacher's signal and write it to ``out``.

    ``--method dpo`` trains on preference pairs against ``ref`` (default: the student itself)
    through a reference log-prob cache (``ref_cache``, built when absent); ``--method sft``
    is cross-entropy on prompt/completion pairs; ``--method step-by-step`` trains on rationales.
    """
    if cfg.method in ("dpo", "step-by-step") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"--method {cfg.method} runs in one process (no torchrun yet)")
    if cfg.method == "dpo":
        if teacher is not None or teacher_cache is not None:
            raise ConfigError("--method dpo takes --ref (the reference model), not --teacher")
        if eval_data is not None:
            raise ConfigError("--method dpo holds out --eval-fraction of the pairs; no --eval-data")
        from weightsmith.distill.dpo_train import train_dpo

        return train_dpo(student, data, out, cfg, ref=ref, ref_cache=ref_cache, device=device,
                         force=force, progress=progress, max_shard_size=max_shard_size)  # fmt: skip
    if ref is not None or ref_cache is not None:
        raise ConfigError("--ref and --ref-cache are for --method dpo")
    if cfg.method == "step-by-step":
        from weightsmith.distill.stepbystep import train_step_by_step

        if teacher is not None or teacher_cache is not None:
            raise ConfigError("--method step-by-step trains on --data rationales; no --teacher "
                              "(write them with distill rationales)")  # fmt: skip
        return train_step_by_step(student, data, out, cfg, device=device, force=force,
                                  progress=progress, max_shard_size=max_shard_size,
                                  eval_data=eval_data)  # fmt: skip
    if cfg.method == "sft":
        if teacher is not None or teacher_cache is not None:
            raise ConfigError(
                "--method sft trains on the completions in --data; it takes no --teacher "
                "(write them with distill generate)"
            )
        cfg = replace(cfg, loss=replace(cfg.loss, alpha=1.0))
    start = time.perf_counter()
    dev = _device(device)
    pg = init_process_group(dev.type)
    if pg.world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", pg.local_rank)
    _check_inputs(teacher, teacher_cache, cfg, pg)
    inputs = [Path(p) for p in (teacher, student, teacher_cache) if p is not None]
    check_output_location(Path(out).absolute(), inputs, force)  # fail before training
    notes: list[str] = []

    s_tok = load_tokenizer(student)
    records = read_records(data)
    src = _Teacher()
    t_model = None
    if teacher is not None and (cfg.method == "seqkd" or teacher_cache is None):
        t_model = load_model(teacher, dev)
    if cfg.method == "seqkd":
        t_tok = load_tokenizer(teacher)
        prompts = prompts_of(records, t_tok, cfg)
        pairs = generate_pairs(
            t_model, t_tok, prompts, cfg, dev, rank=pg.rank, world=pg.world, progress=progress
        )
        notes.append(f"seqkd: teacher generated {len(pairs)} completions")
        records = Records([], pairs, records.fingerprint)
        cfg = replace(cfg, loss=replace(cfg.loss, alpha=1.0))
        t_model = None
    examples = tokenize_records(records, s_tok, cfg.seq_len)

    student_model = load_model(student, dev, nf4=cfg.qlora, trainable=True)
    s_width = logits_width(student_model)
    if cfg.method == "kd" and cfg.loss.alpha < 1.0:
        if teacher_cache is not None:
            src.cache = TeacherCache(teacher_cache)
            t_fp = None
            if teacher is not None:
                with open_checkpoint(teacher) as c:
                    t_fp = c.fingerprint()
            s_hash = tokenizer_hash(s_tok)
            src.cache.check(
                data_fingerprint=data_fingerprint(records, s_hash, cfg.seq_len),
                tokenizer_hash=s_hash,
                temperature=cfg.loss.temperature,
                teacher_fingerprint=t_fp,
            )
            src.common = min(int(src.cache.meta["vocab_length"]), s_width)
        else:
            src.model = t_model
            plan = plan_vocab(
                load_tokenizer(teacher), s_tok, logits_width(t_model), s_width,
                where=(f"teacher {teacher}", f"student {student}"),
            )  # fmt: skip
            src.common = plan.common
            if plan.note:
                notes.append(plan.note)
    if cfg.lora is not None:
        student_model = wrap_lora(student_model, cfg.lora, nf4=cfg.qlora, seed=cfg.seed)
    params = [p for p in student_model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)

    eval_examples = None
    if eval_data is not None:
        eval_examples = tokenize_records(read_records(eval_data), s_tok, cfg.seq_len)
    eval_teacher = t_model if eval_examples is not None else None
    eval_before = None
    if eval_examples is not None:
        eval_before = evaluate(student_model, eval_examples, s_tok, cfg, dev, pg, eval_teacher)

    total = cfg.steps or max(
        1, math.ceil((cfg.epochs or 1.0) * len(examples) / (cfg.batch_size * cfg.grad_accum))
    )
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * total)
    batches = _micro_batches(len(examples), cfg.batch_size, cfg.seed)
    losses: list[float] = []
    seen_tokens = 0
    trained = 0
    bar = tqdm(total=total, desc="distill", unit="step", disable=not (progress and pg.main))
    train_start = time.perf_counter()
    student_model.train()
    with bar:
        for step in range(total):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, total, warmup, cfg.min_lr_ratio)
            micro = [next(batches)[pg.rank :: pg.world] for _ in range(cfg.grad_accum)]
            collated = [collate([examples[i] for i in idx], s_tok.pad_token_id) for idx in micro]
            local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in collated)
            global_tokens = int(all_reduce_sum(torch.tensor(float(local)), pg.world).item())
            step_loss = torch.zeros(())
            for idx, batch in zip(micro, collated, strict=True):
                parts = _micro_step(student_model, batch, idx, src, cfg, dev, global_tokens)
                parts.loss.backward()
                step_loss += parts.loss.detach().cpu()
                seen_tokens += int(batch["attention_mask"].sum())
            all_reduce_grads(params, pg.world)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(all_reduce_sum(step_loss, pg.world))
            losses.append(loss)
            trained += global_tokens
            elapsed = time.perf_counter() - train_start
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{seen_tokens * pg.world / elapsed:.0f}")
            bar.update(1)
    train_wall = time.perf_counter() - train_start
    train_peak_rss = peak_rss_bytes()  # saving a merged LoRA holds extra copies: report apart
    input_tokens = int(all_reduce_sum(torch.tensor(float(seen_tokens)), pg.world).item())

    eval_after = None
    if eval_examples is not None:
        eval_after = evaluate(student_model, eval_examples, s_tok, cfg, dev, pg, eval_teacher)
    result = DistillResult(
        out=str(Path(out).absolute()),
        steps=total,
        train_tokens=trained,
        tokens_per_s=round(input_tokens / max(train_wall, 1e-9), 1),
        wall_s=0.0,
        peak_rss=0,
        losses=[round(x, 6) for x in losses],
        eval_before=eval_before,
        eval_after=eval_after,
        notes=notes,
        world_size=pg.world,
        train_peak_rss=train_peak_rss,
    )
    if pg.main:
        _save(student_model, student, out, cfg, teacher, teacher_cache, records, s_tok, result,
              force=force, progress=progress, max_shard_size=max_shard_size)  # fmt: skip
    barrier(pg.world)
    if src.cache is not None:
        src.cache.close()
    result.wall_s = round(time.perf_counter() - start, 3)
    result.peak_rss = peak_rss_bytes()
    return result


def _check_inputs(teacher, teacher_cache, cfg: DistillConfig, pg: ProcessGroup) -> None:
    if cfg.method == "seqkd":
        if teacher is None:
            raise ConfigError("--method seqkd needs --teacher (it generates the completions)")
        if teacher_cache is not None:
            raise ConfigError("--method seqkd does not use --teacher-cache")
    elif cfg.loss.alpha < 1.0 and teacher is None and teacher_cache is None:
        raise ConfigError("give --teacher or --teacher-cache (or --alpha 1 for CE only)")
    if cfg.batch_size % pg.world:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be divisible by the {pg.world} processes"
        )


def _micro_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Global micro-batches of example indices: a seeded reshuffle every epoch."""
    gen = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending += torch.randperm(n, generator=gen).tolist()
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _micro_step(model, batch, idx, src: _Teacher, cfg, dev, global_tokens):
    input_ids = batch["input_ids"].to(dev)
    attn = batch["attention_mask"].to(dev)
    logits, labels = shift_for_next_token(
        model(input_ids=input_ids, attention_mask=attn).logits, batch["labels"].to(dev)
    )
    kwargs: dict = {}
    if src.model is not None:
        with torch.no_grad():
            t_logits = src.model(input_ids=input_ids, attention_mask=attn).logits
        kwargs["teacher_logits"] = t_logits[:, :-1, : src.common]
    elif src.cache is not None:
        ids, logp, tail = src.cache.rows(idx, input_ids.shape[1] - 1)
        if src.common is not None and int(ids.max()) >= src.common:
            raise ConfigError(
                f"teacher cache top-k holds token ids >= the student's {src.common} logits"
            )
        kwargs["teacher_topk"] = (ids.to(dev), logp.to(dev), tail.to(dev))
    if src.common is not None:
        logits = logits[..., : src.common]
    return distillation_loss(logits, labels, cfg.loss, global_tokens, **kwargs)


@torch.no_grad()
def evaluate(
    model, examples: list[Example], tok, cfg: DistillConfig, dev, pg: ProcessGroup, teacher=None
) -> dict:
    """Held-out CE per completion token, perplexity, and KL(teacher ‖ student) at τ = 1."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # ce, kl, tokens
    mine = examples[pg.rank :: pg.world]
    for b in range(0, len(mine), cfg.batch_size):
        batch = collate(mine[b : b + cfg.batch_size], tok.pad_token_id)
        ids, attn = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        logits, labels = shift_for_next_token(
            model(input_ids=ids, attention_mask=attn).logits.float(), batch["labels"].to(dev)
        )
        mask = labels != IGNORE_INDEX
        sums[0] += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        sums[2] += int(mask.sum())
        if teacher is not None:
            t_logits = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            width = min(t_logits.shape[-1], logits.shape[-1])
            kl = forward_kl(
                F.log_softmax(logits[mask][:, :width], -1),
                F.log_softmax(t_logits[mask][:, :width], -1),
            )
            sums[1] += float(kl.sum())
    all_reduce_sum(sums, pg.world)
    model.train(was_training)
    n = max(float(sums[2]), 1.0)
    out = {"tokens": int(sums[2]), "ce": float(sums[0]) / n, "ppl": math.exp(float(sums[0]) / n)}
    if teacher is not None:
        out["kl_to_teacher"] = float(sums[1]) / n
    return out


def _optimizer(params, cfg: DistillConfig):
    if not params:
        raise ConfigError("the student has no trainable parameters")
    if cfg.optim == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--optim adamw8bit needs bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save(model, student, out, cfg, teacher, teacher_cache, records, s_tok, result, *,
          force, progress, max_shard_size) -> None:  # fmt: skip
    provenance = {
        "operation": "distill",
        "config": asdict(cfg),
        "teacher": str(teacher) if teacher else None,
        "teacher_cache": str(teacher_cache) if teacher_cache else None,
        "data_fingerprint": records.fingerprint,
        "tokenizer_hash": tokenizer_hash(s_tok),
        "training": {
            "steps": result.steps,
            "train_tokens": result.train_tokens,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "world_size": result.world_size,
        },
        "notes": result.notes,
    }
    extra = [open_checkpoint(teacher)] if teacher else []
    try:
        if cfg.lora is not None and cfg.save_adapter:
            from peft import get_peft_model_state_dict

            state = {
                k: v.detach().cpu().float() for k, v in get_peft_model_state_dict(model).items()
            }
            adapter_cfg = model.peft_config["default"].to_dict()
            adapter_cfg["base_model_name_or_path"] = str(Path(student).absolute())
            adapter_cfg = {
                k: sorted(v) if isinstance(v, set) else v for k, v in adapter_cfg.items()
            }
            inputs = tuple(Path(p) for p in (student, teacher, teacher_cache) if p)
            write_adapter(out, state, adapter_cfg, provenance, inputs=inputs, force=force)
            return
        with open_checkpoint(student) as ckpt:
            names = set(ckpt.tensors)
        if cfg.lora is not None:
            weights = merged_weights(student, lora_deltas(model))
        else:
            weights = full_weights(model, names)
        write_student(student, out, new_weights=weights, provenance=provenance,
                      max_shard_size=max_shard_size, force=force, progress=progress,
                      extra_inputs=tuple(extra))  # fmt: skip
    finally:
        for c in extra:
            c.close()
