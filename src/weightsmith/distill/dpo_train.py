"""``distill --method dpo``: DPO against reference log-probs precomputed once and read from disk.

Order of work: reference model loaded → log-probs of every pair cached (safetensors,
fingerprinted) → reference freed → student loaded (full or LoRA) → trained on the training
pairs → reward accuracy/margins measured on held-out pairs before and after → saved.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from weightsmith.core.report import peak_rss_bytes
from weightsmith.distill.cache import _device
from weightsmith.distill.config import DistillConfig
from weightsmith.distill.data import Records
from weightsmith.distill.dpo import AVERAGED_LOSSES, DpoSettings, dpo_loss, reward_stats
from weightsmith.distill.models import load_model, load_tokenizer, wrap_lora
from weightsmith.distill.preference import (
    RefLogps,
    batch_logps,
    build_ref_logps,
    pair_logps,
    pairs_fingerprint,
    read_pairs,
    tokenize_pairs,
)
from weightsmith.distill.schedule import lr_factor
from weightsmith.distill.vocab import tokenizer_hash
from weightsmith.errors import ConfigError
from weightsmith.io.paths import check_output_location
from weightsmith.io.reader import open_checkpoint
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE


def split_pairs(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) index split; at least one pair on each side when n ≥ 2."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(max(1, round(n * fraction)), n - 1)
    return sorted(perm[k:]), sorted(perm[:k])


def _ref_values(ref_cache: RefLogps, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    v = ref_cache.values
    c, r = v["chosen_logps"].float(), v["rejected_logps"].float()
    if loss in AVERAGED_LOSSES:
        c = c / v["chosen_tokens"].clamp(min=1)
        r = r / v["rejected_tokens"].clamp(min=1)
    return c, r


def _policy(logps: torch.Tensor, counts: torch.Tensor, n: int, loss: str):
    if loss in AVERAGED_LOSSES:
        logps = logps / counts.clamp(min=1)
    return logps[:n], logps[n:]


@torch.no_grad()
def evaluate_pairs(model, pairs, idx, ref_c, ref_r, settings: DpoSettings, pad_id, dev, bs):
    """Reward accuracy/margins and mean loss of the policy on pairs ``idx``."""
    if not idx:
        return None
    was = model.training
    model.eval()
    vals = pair_logps(model, [pairs[i] for i in idx], pad_id, dev, bs)
    model.train(was)
    pc, pr = vals["chosen_logps"], vals["rejected_logps"]
    if settings.loss in AVERAGED_LOSSES:
        pc = pc / vals["chosen_tokens"].clamp(min=1)
        pr = pr / vals["rejected_tokens"].clamp(min=1)
    sel = torch.tensor(idx)
    out = dpo_loss(pc, pr, ref_c[sel], ref_r[sel], settings)
    stats = reward_stats(out.chosen_rewards, out.rejected_rewards)
    stats["loss"] = float(out.losses.mean())
    return stats


def train_dpo(
    student, data, out, cfg: DistillConfig, *, ref=None, ref_cache=None, device="auto",
    force=False, progress=True, max_shard_size=None,
):  # fmt: skip
    """Train ``student`` with DPO on the pairs in ``data`` and write it to ``out``."""
    from weightsmith.distill.trainer import DistillResult, _optimizer, _save

    start = time.perf_counter()
    settings = cfg.dpo or DpoSettings()
    cfg = replace(cfg, dpo=settings)  # the provenance records the settings actually used
    dev = _device(device)
    ref = ref or student  # Zephyr: the dSFT model is both the start and the reference
    inputs = [Path(p) for p in (ref, student, ref_cache) if p is not None and Path(p).exists()]
    check_output_location(Path(out).absolute(), inputs, force)
    tok = load_tokenizer(student)
    if tokenizer_hash(load_tokenizer(ref)) != tokenizer_hash(tok):
        raise ConfigError(f"--ref {ref} and --student {student} have different tokenizers")
    pairs_data = read_pairs(data)
    examples = tokenize_pairs(pairs_data, tok, cfg.seq_len)
    t_hash = tokenizer_hash(tok)
    with open_checkpoint(ref) as c:
        ref_fp = c.fingerprint()
    notes = [f"dpo: reference {ref}"]
    tmp = None
    if ref_cache is None or not Path(ref_cache).exists():
        target = ref_cache
        if target is None:
            tmp = tempfile.mkdtemp(prefix=".ref-logps-", dir=Path(out).absolute().parent)
            target = Path(tmp) / "cache"
        build_ref_logps(ref, data, target, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                        device=dev, progress=progress)  # fmt: skip
        notes.append(f"dpo: reference log-probs computed for {len(examples)} pairs")
    else:
        target = ref_cache
        notes.append(f"dpo: reference log-probs read from {ref_cache}")
    try:
        cache = RefLogps(target)
        cache.check(
            data_fingerprint=pairs_fingerprint(pairs_data, t_hash, cfg.seq_len),
            tokenizer_hash=t_hash,
            ref_fingerprint=ref_fp,
        )
        ref_c, ref_r = _ref_values(cache, settings.loss)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    train_idx, eval_idx = split_pairs(len(examples), settings.eval_fraction, cfg.seed)
    model = load_model(student, dev, nf4=cfg.qlora, trainable=True)
    if cfg.lora is not None:
        model = wrap_lora(model, cfg.lora, nf4=cfg.qlora, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)
    pad = tok.pad_token_id
    eval_before = evaluate_pairs(model, examples, eval_idx, ref_c, ref_r, settings, pad, dev,
                                 cfg.batch_size)  # fmt: skip

    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.steps or max(1, -(-int((cfg.epochs or 1.0) * len(train_idx)) // per_step))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * total)
    gen = torch.Generator().manual_seed(cfg.seed)
    pending: list[int] = []
    losses, accs, tokens = [], [], 0
    bar = tqdm(total=total, desc="dpo", unit="step", disable=not progress)
    t0 = time.perf_counter()
    model.train()
    with bar:
        for step in range(total):
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, total, warmup, cfg.min_lr_ratio)
            step_loss, correct = 0.0, 0
            for _ in range(cfg.grad_accum):
                while len(pending) < cfg.batch_size:
                    pending += [train_idx[j] for j in torch.randperm(len(train_idx), generator=gen)]
                idx, pending = pending[: cfg.batch_size], pending[cfg.batch_size :]
                part = [examples[i] for i in idx]
                logps, counts = batch_logps(model, part, pad, dev)
                pc, pr = _policy(logps, counts, len(idx), settings.loss)
                sel = torch.tensor(idx)
                o = dpo_loss(pc, pr, ref_c[sel].to(dev), ref_r[sel].to(dev), settings)
                (o.losses.sum() / per_step).backward()
                step_loss += float(o.losses.detach().sum()) / per_step
                correct += int((o.chosen_rewards > o.rejected_rewards).sum())
                tokens += int(counts.sum())
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            accs.append(correct / per_step)
            bar.set_postfix(loss=f"{step_loss:.4f}", acc=f"{accs[-1]:.2f}")
            bar.update(1)
    train_wall = time.perf_counter() - t0
    eval_after = evaluate_pairs(model, examples, eval_idx, ref_c, ref_r, settings, pad, dev,
                                cfg.batch_size)  # fmt: skip
    if eval_idx:
        notes.append(f"dpo: {len(train_idx)} training pairs, {len(eval_idx)} held out")
    else:
        notes.append("dpo: no held-out pairs (--eval-fraction 0 or a single pair)")
    result = DistillResult(
        out=str(Path(out).absolute()), steps=total, train_tokens=tokens,
        tokens_per_s=round(tokens / max(train_wall, 1e-9), 1), wall_s=0.0, peak_rss=0,
        losses=[round(x, 6) for x in losses], eval_before=eval_before, eval_after=eval_after,
        notes=notes,
    )  # fmt: skip
    records = Records([], [], pairs_data.fingerprint)
    _save(model, student, out, cfg, None, ref_cache, records, tok, result, force=force,
          progress=progress, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)  # fmt: skip
    result.wall_s = round(time.perf_counter() - start, 3)
    result.peak_rss = peak_rss_bytes()
    return result
