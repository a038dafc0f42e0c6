"""``--method dpo``: DPO against reference log-probs precomputed once and read from disk.

Order of work: reference model loaded → log-probs of every pair cached (safetensors,
fingerprinted) → reference freed → student loaded (full or LoRA) → trained on the training
pairs → reward accuracy/margins measured on held-out pairs before and after → saved.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import weightsmith.distill.methods.base as base
from weightsmith.core.device import select_device
from weightsmith.core.models import load_tokenizer
from weightsmith.core.training import StepOutput, train
from weightsmith.distill.dpo import AVERAGED_LOSSES, DpoSettings, dpo_loss, reward_stats
from weightsmith.distill.methods.base import DistillResult, DistillRun, distill_method
from weightsmith.distill.preference import (
    RefLogps,
    batch_logps,
    build_ref_logps,
    pair_logps,
    pairs_fingerprint,
    read_pairs,
    tokenize_pairs,
)
from weightsmith.distill.vocab import tokenizer_hash
from weightsmith.errors import ConfigError
from weightsmith.io.reader import open_checkpoint


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


_NO_TEACHER = "--method dpo takes --ref (the reference model), not --teacher"


@distill_method("dpo", inputs=("ref", "ref_cache"), options=("dpo",),
                refuse={"teacher": _NO_TEACHER, "teacher_cache": _NO_TEACHER,
                        "eval_data": "--method dpo holds out --eval-fraction of the pairs; "
                                     "no --eval-data"})  # fmt: skip
def train_dpo(run: DistillRun) -> DistillResult:
    """Direct preference optimisation on chosen/rejected pairs against a reference model."""
    settings = run.cfg.dpo or DpoSettings()
    cfg = replace(run.cfg, dpo=settings)  # the provenance records the settings actually used
    dev = select_device(run.device)
    ref = run.ref or run.student  # Zephyr: the dSFT model is both the start and the reference
    base.check_output(run, [p for p in (ref, run.student, run.ref_cache) if p and Path(p).exists()])
    tok = load_tokenizer(run.student)
    if tokenizer_hash(load_tokenizer(ref)) != tokenizer_hash(tok):
        raise ConfigError(f"--ref {ref} and --student {run.student} have different tokenizers")
    pairs_data = read_pairs(run.data)
    examples = tokenize_pairs(pairs_data, tok, cfg.seq_len)
    notes = [f"dpo: reference {ref}"]
    ref_c, ref_r = _reference_logps(run, cfg, ref, pairs_data, tok, dev, notes)
    train_idx, eval_idx = split_pairs(len(examples), settings.eval_fraction, cfg.seed)
    model = base.add_lora(base.load_student(run, dev), cfg)
    pad = tok.pad_token_id

    def evaluate() -> dict | None:
        return evaluate_pairs(model, examples, eval_idx, ref_c, ref_r, settings, pad, dev,
                              cfg.batch_size)  # fmt: skip

    task = _DpoTask(model, examples, train_idx, ref_c, ref_r, settings, pad, dev)
    tr = train(model, task, len(train_idx), base.loop_config(cfg), evaluate=evaluate,
               progress=run.progress, desc="dpo")  # fmt: skip
    if eval_idx:
        notes.append(f"dpo: {len(train_idx)} training pairs, {len(eval_idx)} held out")
    else:
        notes.append("dpo: no held-out pairs (--eval-fraction 0 or a single pair)")
    result = base.make_result(run, tr, tr.tokens, notes)
    base.save_student(run, model, cfg, pairs_data.fingerprint, tok, result,
                 teacher_cache=run.ref_cache)  # fmt: skip
    return base.finish(run, result)


class _DpoTask:
    """Micro-batches of preference pairs; the loss is summed over pairs / pairs in the step."""

    def __init__(self, model, examples, train_idx, ref_c, ref_r, settings, pad_id, dev) -> None:
        self.model, self.examples, self.train_idx = model, examples, train_idx
        self.ref_c, self.ref_r, self.settings = ref_c, ref_r, settings
        self.pad_id, self.dev = pad_id, dev

    def batch(self, indices: list[int]) -> list[int]:
        return [self.train_idx[j] for j in indices]  # positions in the training split -> pairs

    def count(self, batch: list[int]) -> int:
        return len(batch)

    def step(self, batch: list[int], indices: list[int], normaliser: int) -> StepOutput:
        part = [self.examples[i] for i in batch]
        logps, counts = batch_logps(self.model, part, self.pad_id, self.dev)
        pc, pr = _policy(logps, counts, len(batch), self.settings.loss)
        sel = torch.tensor(batch)
        o = dpo_loss(pc, pr, self.ref_c[sel].to(self.dev), self.ref_r[sel].to(self.dev),
                     self.settings)  # fmt: skip
        acc = float((o.chosen_rewards > o.rejected_rewards).float().mean())
        return StepOutput(o.losses.sum() / normaliser, int(counts.sum()), {"acc": acc})


def _reference_logps(run: DistillRun, cfg, ref, pairs_data, tok, dev, notes: list[str]):
    """The reference's (chosen, rejected) log-probs: read from --ref-cache, or computed once."""
    t_hash = tokenizer_hash(tok)
    with open_checkpoint(ref) as c:
        ref_fp = c.fingerprint()
    tmp = None
    try:  # the temporary cache goes on any exit: an error, Ctrl-C, SIGTERM
        if run.ref_cache is None or not Path(run.ref_cache).exists():
            target = run.ref_cache
            if target is None:
                tmp = tempfile.mkdtemp(prefix=".ref-logps-", dir=Path(run.out).absolute().parent)
                target = Path(tmp) / "cache"
            build_ref_logps(ref, run.data, target, seq_len=cfg.seq_len,
                            batch_size=cfg.batch_size, device=dev, progress=run.progress)  # fmt: skip
            notes.append(f"dpo: reference log-probs computed for {len(pairs_data)} pairs")
        else:
            target = run.ref_cache
            notes.append(f"dpo: reference log-probs read from {run.ref_cache}")
        cache = RefLogps(target)
        cache.check(
            data_fingerprint=pairs_fingerprint(pairs_data, t_hash, cfg.seq_len),
            tokenizer_hash=t_hash,
            ref_fingerprint=ref_fp,
        )
        return _ref_values(cache, cfg.dpo.loss)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
