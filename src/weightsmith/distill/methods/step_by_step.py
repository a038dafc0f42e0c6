"""``--method step-by-step`` (Hsieh et al. 2023): multi-task training on labels and
teacher rationales. Each question becomes two examples,

- ``predict: {question}`` -> `` {answer}``      (the task; all that is needed at inference)
- ``explain: {question}`` -> `` {rationale}``   (extra supervision)

and the loss is ``α·L_label + (1−α)·L_rationale`` (paper eq. 3), each term the mean
cross-entropy over that task's completion tokens in the step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

import weightsmith.distill.methods.base as base
from weightsmith.core.answers import PREDICT_TEMPLATE as PREDICT
from weightsmith.core.answers import answer_accuracy
from weightsmith.core.device import select_device
from weightsmith.core.jsonl import read_jsonl
from weightsmith.core.models import load_tokenizer
from weightsmith.core.training import StepOutput, train
from weightsmith.core.training.data import Example, collate
from weightsmith.core.training.losses import IGNORE_INDEX, shift_for_next_token
from weightsmith.distill.methods.base import DistillResult, DistillRun, distill_method
from weightsmith.distill.preference import tokenize_completion
from weightsmith.errors import ConfigError

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


_NO_TEACHER = ("--method step-by-step trains on --data rationales; no --teacher "
               "(write them with distill rationales)")  # fmt: skip


@distill_method("step-by-step", inputs=("eval_data",), options=("sbs_alpha",),
                refuse={"teacher": _NO_TEACHER, "teacher_cache": _NO_TEACHER})  # fmt: skip
def train_step_by_step(run: DistillRun) -> DistillResult:
    """Multi-task training on teacher rationales and labels (Hsieh et al. 2023)."""
    cfg = run.cfg
    if cfg.grad_accum != 1:
        raise ConfigError("--method step-by-step takes one micro-batch per step (--grad-accum 1)")
    dev = select_device(run.device)
    base.check_output(run, [run.student])
    rows = read_jsonl(run.data, ["question", "rationale"])
    for i, r in enumerate(rows):
        if "answer" not in r:
            raise ConfigError(f"{run.data}: row {i + 1} has no 'answer'")
    tok = load_tokenizer(run.student)
    examples = task_examples(rows, tok, cfg.seq_len)
    model = base.add_lora(base.load_student(run, dev), cfg)
    held_out = read_jsonl(run.eval_data, ["question"]) if run.eval_data is not None else None

    def evaluate() -> dict | None:
        if held_out is None:
            return None
        return answer_accuracy(model, tok, held_out, template=PREDICT, batch_size=cfg.batch_size)

    task = _MultiTask(model, examples, tok.pad_token_id, cfg.sbs_alpha, dev)
    tr = train(model, task, len(rows), base.loop_config(cfg), evaluate=evaluate,
               progress=run.progress, desc="step-by-step")  # fmt: skip
    notes = [f"step-by-step: {len(rows)} questions, alpha {cfg.sbs_alpha}"]
    result = base.make_result(run, tr, tr.tokens, notes)
    base.save_student(run, model, cfg, _fingerprint(run.data), tok, result)
    return base.finish(run, result)


class _MultiTask:
    """Each micro-batch of questions runs the label and the rationale task (one with weight 0
    adds exactly nothing to the gradient, so its forward pass is skipped)."""

    def __init__(self, model, examples, pad_id: int, alpha: float, dev) -> None:
        self.model, self.examples, self.pad_id, self.alpha, self.dev = (
            model, examples, pad_id, alpha, dev,
        )  # fmt: skip
        self.tasks = tuple(t for t, w in enumerate((alpha, 1 - alpha)) if w > 0)

    def batch(self, indices: list[int]) -> list[dict]:
        return [collate([self.examples[i][t] for i in indices], self.pad_id) for t in self.tasks]

    def count(self, batch: list[dict]) -> int:
        return len(batch[0]["input_ids"])  # questions (each task's loss is its own mean)

    def step(self, batch: list[dict], indices: list[int], normaliser: int) -> StepOutput:
        parts, tokens = [], 0
        for b in batch:
            logits = self.model(input_ids=b["input_ids"].to(self.dev),
                                attention_mask=b["attention_mask"].to(self.dev)).logits  # fmt: skip
            parts.append(shift_for_next_token(logits, b["labels"].to(self.dev)))
            tokens += int(b["attention_mask"].sum())
        if len(parts) == 2:
            loss, ll, lr_ = multitask_loss(*parts[0], *parts[1], self.alpha)
        else:  # α = 1 or 0: the other task has no weight, so its forward pass is skipped
            loss = task_loss(*parts[0])
            nan = torch.tensor(float("nan"))
            ll, lr_ = (loss, nan) if self.tasks == (0,) else (nan, loss)
        return StepOutput(loss, tokens, {"label": float(ll.detach()),
                                         "rationale": float(lr_.detach())})  # fmt: skip


def _fingerprint(path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
