"""``distill --method step-by-step`` (Hsieh et al. 2023): multi-task training on labels and
teacher rationales. Each question becomes two examples,

- ``predict: {question}`` -> `` {answer}``      (the task; all that is needed at inference)
- ``explain: {question}`` -> `` {rationale}``   (extra supervision)

and the loss is ``α·L_label + (1−α)·L_rationale`` (paper eq. 3), each term the mean
cross-entropy over that task's completion tokens in the step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from weightsmith.core.report import peak_rss_bytes
from weightsmith.distill.cache import _device
from weightsmith.distill.config import DistillConfig
from weightsmith.distill.data import Example, Records, collate
from weightsmith.distill.generate import read_jsonl
from weightsmith.distill.losses import IGNORE_INDEX, shift_for_next_token
from weightsmith.distill.models import load_model, load_tokenizer, wrap_lora
from weightsmith.distill.preference import tokenize_completion
from weightsmith.distill.schedule import lr_factor
from weightsmith.errors import ConfigError
from weightsmith.io.paths import check_output_location
from weightsmith.io.writer import DEFAULT_MAX_SHARD_SIZE

PREDICT = "predict: {question}\n"
EXPLAIN = "explain: {question}\n"


def task_prompts(question: str) -> tuple[str, str]:
    return PREDICT.format(question=question), EXPLAIN.format(question=question)


def multitask_loss(
    label_logits: torch.Tensor, label_labels: torch.Tensor,
    rationale_logits: torch.Tensor, rationale_labels: torch.Tensor, alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(α·L_label + (1−α)·L_rationale, L_label, L_rationale): mean CE over aligned positions."""
    ll = task_loss(label_logits, label_labels)
    lr = task_loss(rationale_logits, rationale_labels)
    return alpha * ll + (1 - alpha) * lr, ll, lr


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX)  # fmt: skip


def task_examples(rows: list[dict], tok, seq_len: int) -> list[tuple[Example, Example]]:
    out = []
    for i, r in enumerate(rows):
        p, e = task_prompts(r["question"])
        label = tokenize_completion(tok, p, " " + str(r["answer"]), seq_len)
        rationale = tokenize_completion(tok, e, " " + r["rationale"], seq_len)
        for ex in (label, rationale):
            if not any(x != IGNORE_INDEX for x in ex.labels[1:]):
                raise ConfigError(f"row {i}: the prompt fills --seq-len {seq_len}")
        out.append((label, rationale))
    return out


def train_step_by_step(student, data, out, cfg: DistillConfig, *, device="auto", force=False,
                       progress=True, max_shard_size=DEFAULT_MAX_SHARD_SIZE, eval_data=None):  # fmt: skip
    """Train ``student`` on the rationale rows of ``data`` and write it to ``out``."""
    from weightsmith.distill.trainer import DistillResult, _optimizer, _save

    start = time.perf_counter()
    dev = _device(device)
    check_output_location(Path(out).absolute(), [Path(student)], force)
    rows = read_jsonl(data, ["question", "rationale"])
    for i, r in enumerate(rows):
        if "answer" not in r:
            raise ConfigError(f"{data}: row {i + 1} has no 'answer'")
    tok = load_tokenizer(student)
    examples = task_examples(rows, tok, cfg.seq_len)
    model = load_model(student, dev, nf4=cfg.qlora, trainable=True)
    if cfg.lora is not None:
        model = wrap_lora(model, cfg.lora, nf4=cfg.qlora, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)
    acc_before = _accuracy(model, tok, eval_data, cfg, dev)
    total = cfg.steps or max(1, -(-int((cfg.epochs or 1.0) * len(rows)) // cfg.batch_size))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * total)
    # a task with zero weight adds exactly nothing to the gradient: do not run its forward pass
    trained_tasks = tuple(t for t, w in enumerate((cfg.sbs_alpha, 1 - cfg.sbs_alpha)) if w > 0)
    gen = torch.Generator().manual_seed(cfg.seed)
    pending: list[int] = []
    losses, tokens = [], 0
    bar = tqdm(total=total, desc="step-by-step", unit="step", disable=not progress)
    t0 = time.perf_counter()
    model.train()
    with bar:
        for step in range(total):
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, total, warmup, cfg.min_lr_ratio)
            while len(pending) < cfg.batch_size:
                pending += torch.randperm(len(rows), generator=gen).tolist()
            idx, pending = pending[: cfg.batch_size], pending[cfg.batch_size :]
            parts = []
            for task in trained_tasks:
                b = collate([examples[i][task] for i in idx], tok.pad_token_id)
                logits = model(input_ids=b["input_ids"].to(dev),
                               attention_mask=b["attention_mask"].to(dev)).logits  # fmt: skip
                parts.append(shift_for_next_token(logits, b["labels"].to(dev)))
                tokens += int(b["attention_mask"].sum())
            if len(parts) == 2:
                loss, ll, lr_ = multitask_loss(*parts[0], *parts[1], cfg.sbs_alpha)
            else:  # α = 1 or 0: the other task has no weight, so its forward pass is skipped
                loss = task_loss(*parts[0])
                nan = torch.tensor(float("nan"))
                ll, lr_ = (loss, nan) if trained_tasks == (0,) else (nan, loss)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(
                label=f"{float(ll.detach()):.3f}", rationale=f"{float(lr_.detach()):.3f}"
            )
            bar.update(1)
    wall = time.perf_counter() - t0
    acc_after = _accuracy(model, tok, eval_data, cfg, dev)
    result = DistillResult(
        out=str(Path(out).absolute()), steps=total, train_tokens=tokens,
        tokens_per_s=round(tokens / max(wall, 1e-9), 1), wall_s=0.0, peak_rss=0,
        losses=[round(x, 6) for x in losses], eval_before=acc_before, eval_after=acc_after,
        notes=[f"step-by-step: {len(rows)} questions, alpha {cfg.sbs_alpha}"],
    )  # fmt: skip
    _save(model, student, out, cfg, None, None, Records([], [], _fingerprint(data)), tok,
          result, force=force, progress=progress, max_shard_size=max_shard_size)  # fmt: skip
    result.wall_s = round(time.perf_counter() - start, 3)
    result.peak_rss = peak_rss_bytes()
    return result


def _fingerprint(path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _accuracy(model, tok, eval_data, cfg: DistillConfig, dev) -> dict | None:
    if eval_data is None:
        return None
    from weightsmith.evaluate.accuracy import answer_accuracy

    return answer_accuracy(model, tok, read_jsonl(eval_data, ["question"]), template=PREDICT,
                           batch_size=cfg.batch_size)  # fmt: skip
