"""Answers to questions: parse a model's answer out of its text, compare it with a gold one, and
score an in-memory model's answer accuracy (greedy, in the ``predict:`` format step-by-step
students are trained on)."""

from __future__ import annotations

import math
import re

import torch

from weightsmith.core.generation import GenerateConfig, generate_texts

PREDICT_TEMPLATE = "predict: {question}\n"

# The last of these markers in the text introduces the answer.
_MARKERS = re.compile(
    r"(?:(?:the\s+)?(?:final\s+)?answer\s+is\s*:?|final\s+answer\s*:|answer\s*:|####)",
    re.IGNORECASE,
)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$")
_LEADING_NUMBER = re.compile(r"^[\$€£]?\s*([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?:\s|$)")
_CONNECTIVE = re.compile(r"[\s,]*(?:so|thus|therefore|hence)[\s,]*$", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """Canonical form: no markdown/quotes/currency/trailing punctuation, numbers as plain digits
    ("1,000.50" -> "1000.5", "3.0" -> "3", "$5" -> "5", "-0" -> "0"), words lower-cased."""
    s = text.strip().strip("*_`\"'“”‘’ ")
    s = re.sub(r"^[\$€£]\s*", "", s)
    s = re.sub(r"[.,;:!?)\]]+$", "", s).strip()
    s = re.sub(r"^[(\[]+", "", s).strip()
    s = re.sub(r"\s*(?:%|dollars?|units?)$", "", s, flags=re.IGNORECASE)
    s = re.sub(r"^[\$€£]\s*", "", s)
    if _NUMBER.match(s):
        value = float(s.replace(",", ""))
        if value.is_integer():
            return str(int(value)) if value != 0 else "0"
        return repr(value)
    return " ".join(s.lower().split())


def parse_answer(text: str) -> tuple[str, str] | None:
    """(rationale, answer) from a teacher's output, or None when no answer can be found.

    The answer follows the *last* marker ("the answer is", "Answer:", "####", ``\\boxed{}``),
    up to the end of its line or sentence; an answer that is a number may contain "," and ".".
    """
    boxed = list(_BOXED.finditer(text))
    markers = list(_MARKERS.finditer(text))
    if boxed and (not markers or boxed[-1].start() > markers[-1].start()):
        m = boxed[-1]
        answer = normalize_answer(m.group(1))
        return (text[: m.start()].strip(), answer) if answer else None
    if not markers:
        return None
    m = markers[-1]
    tail = text[m.end() :].strip().split("\n", 1)[0]
    # a sentence ends at ". " (not inside a number like 3.5) or at the line end
    tail = re.split(r"(?<!\d)\.(?:\s|$)|\.\s", tail, maxsplit=1)[0]
    number = _LEADING_NUMBER.match(tail.strip().strip("*_`"))
    answer = normalize_answer(number.group(1) if number else tail)  # "3.5 apples" -> "3.5"
    if not answer:
        return None
    return _CONNECTIVE.sub("", text[: m.start()]).strip(), answer


def answers_agree(predicted: str, gold: str) -> bool:
    """Equal after normalization, numbers compared as numbers (1e-6 relative)."""
    a, b = normalize_answer(predicted), normalize_answer(gold)
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    except ValueError:
        return a == b


def prediction_of(text: str) -> str:
    """A model's answer: the parsed one, else its first non-empty line, normalized."""
    parsed = parse_answer(text)
    if parsed is not None:
        return parsed[1]
    for line in text.splitlines():
        if line.strip():
            return normalize_answer(line)
    return ""


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
