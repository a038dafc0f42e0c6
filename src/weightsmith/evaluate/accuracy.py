"""Answer accuracy on a task file (``{"question", "answer"}`` JSON lines): the model answers each
question greedily (by default in the ``predict:`` format step-by-step students are trained on)
and its answer is compared with the gold one after normalization (numbers as numbers)."""

from __future__ import annotations

import os
import time

import torch

from weightsmith.distill.generate import GenerateConfig, generate_texts, read_jsonl
from weightsmith.distill.rationales import answers_agree, prediction_of

PREDICT_TEMPLATE = "predict: {question}\n"


@torch.no_grad()
def answer_accuracy(
    model, tok, rows: list[dict], *, template: str = PREDICT_TEMPLATE, max_new_tokens: int = 16,
    batch_size: int = 16,
) -> dict:  # fmt: skip
    """{accuracy, correct, total} of an in-memory model on rows with question and answer."""
    was = model.training
    model.eval()
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    correct = 0
    examples = []
    for b in range(0, len(rows), batch_size):
        part = rows[b : b + batch_size]
        texts = generate_texts(model, tok, [template.format(question=r["question"]) for r in part],
                               cfg, seed=0)  # fmt: skip
        for r, t in zip(part, texts, strict=True):
            pred = prediction_of(t)
            ok = answers_agree(pred, str(r["answer"]))
            correct += ok
            if len(examples) < 5:
                examples.append({"question": r["question"], "gold": str(r["answer"]),
                                 "predicted": pred, "correct": ok})  # fmt: skip
    model.train(was)
    total = len(rows)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "examples": examples}  # fmt: skip


def evaluate_accuracy(
    model_dir: str | os.PathLike[str], data: str | os.PathLike[str], *,
    template: str = PREDICT_TEMPLATE, max_new_tokens: int = 16, batch_size: int = 16,
    device: str = "auto",
) -> dict:  # fmt: skip
    """Load ``model_dir`` and measure its answer accuracy on ``data``."""
    from weightsmith.distill.cache import _device
    from weightsmith.distill.models import load_model, load_tokenizer
    from weightsmith.errors import ConfigError

    start = time.perf_counter()
    if "{question}" not in template:
        raise ConfigError("--template must contain {question}")
    rows = read_jsonl(data, ["question"])
    missing = [i for i, r in enumerate(rows, 1) if "answer" not in r]
    if missing:
        raise ConfigError(f"{data}:{missing[0]}: no 'answer' to score against")
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, _device(device))
    out = answer_accuracy(model, tok, rows, template=template, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)  # fmt: skip
    out["wall_s"] = round(time.perf_counter() - start, 3)
    return out
