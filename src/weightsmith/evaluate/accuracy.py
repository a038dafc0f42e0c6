"""Answer accuracy on a task file (``{"question", "answer"}`` JSON lines): the model answers each
question greedily (by default in the ``predict:`` format step-by-step students are trained on)
and its answer is compared with the gold one after normalization (numbers as numbers)."""

from __future__ import annotations

import os
import time

from weightsmith.core.answers import PREDICT_TEMPLATE, answer_accuracy
from weightsmith.core.device import select_device
from weightsmith.core.jsonl import read_jsonl
from weightsmith.core.models import load_model, load_tokenizer
from weightsmith.errors import ConfigError

__all__ = ["PREDICT_TEMPLATE", "answer_accuracy", "evaluate_accuracy"]


def evaluate_accuracy(
    model_dir: str | os.PathLike[str], data: str | os.PathLike[str], *,
    template: str = PREDICT_TEMPLATE, max_new_tokens: int = 16, batch_size: int = 16,
    device: str = "auto",
) -> dict:  # fmt: skip
    """Load ``model_dir`` and measure its answer accuracy on ``data``."""
    start = time.perf_counter()
    if "{question}" not in template:
        raise ConfigError("--template must contain {question}")
    rows = read_jsonl(data, ["question"])
    missing = [i for i, r in enumerate(rows, 1) if "answer" not in r]
    if missing:
        raise ConfigError(f"{data}:{missing[0]}: no 'answer' to score against")
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, select_device(device))
    out = answer_accuracy(model, tok, rows, template=template, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)  # fmt: skip
    out["wall_s"] = round(time.perf_counter() - start, 3)
    return out
