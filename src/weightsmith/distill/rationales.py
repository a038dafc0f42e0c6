"""Teacher rationales for step-by-step distillation (Hsieh et al. 2023).

The teacher answers each question with a chain of thought ending in "the answer is X"; we parse
X robustly, keep (rationale, answer) and drop — and count — rationales whose answer disagrees
with the gold label (when the task has one) or cannot be parsed. Generation is batched and
resumable (see :mod:`weightsmith.distill.generate`).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from weightsmith.distill.generate import GenerateConfig, ResumableJsonl, generate_texts, read_jsonl
from weightsmith.errors import ConfigError

DEFAULT_TEMPLATE = "Question: {question}\nAnswer: Let's think step by step."
FEW_SHOT_SEPARATOR = "\n\n"

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


@dataclass(frozen=True)
class RationaleConfig:
    template: str = DEFAULT_TEMPLATE
    few_shot: int = 0  # first K rows that carry a gold rationale become demonstrations
    generation: GenerateConfig = field(default_factory=lambda: GenerateConfig(max_new_tokens=128))
    version: int = 1

    def __post_init__(self) -> None:
        if "{question}" not in self.template:
            raise ConfigError("--template must contain {question}")
        if self.few_shot < 0:
            raise ConfigError(f"--few-shot must be >= 0, got {self.few_shot}")


def cut_at_next_example(text: str, template: str) -> str:
    """Drop what the teacher writes after its answer when it starts a new example on its own."""
    head = template.split("{question}", 1)[0].strip()
    if head:
        at = text.find(head)
        if at > 0:
            return text[:at]
    return text


def build_prompt(question: str, cfg: RationaleConfig, shots: list[dict]) -> str:
    demos = [cfg.template.format(question=s["question"]) + f" {s['rationale']} The answer is "
             f"{s['answer']}." for s in shots]  # fmt: skip
    return FEW_SHOT_SEPARATOR.join([*demos, cfg.template.format(question=question)])


def generate_rationales(
    teacher: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: RationaleConfig,
    *,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    stop_after: int | None = None,  # tests: simulate an interruption after this many batches
) -> dict:
    """Rows ``{question, answer, rationale, teacher_answer}`` for the questions in ``data``."""
    from weightsmith.distill.cache import _device
    from weightsmith.distill.models import load_model, load_tokenizer

    start = time.perf_counter()
    rows = read_jsonl(data, ["question"])
    shots = [r for r in rows if isinstance(r.get("rationale"), str) and "answer" in r]
    shots = shots[: cfg.few_shot]
    if len(shots) < cfg.few_shot:
        raise ConfigError(f"--few-shot {cfg.few_shot}: {data} has only {len(shots)} rows with "
                          "'rationale' and 'answer'")  # fmt: skip
    store = ResumableJsonl(out, force=force)
    todo = [i for i in range(len(rows)) if i not in store.done]
    g = cfg.generation
    if todo:
        tok = load_tokenizer(teacher)
        model = load_model(teacher, _device(device))
        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="rationales",
                   unit="question", disable=not progress)  # fmt: skip
        with bar:
            for n, b in enumerate(range(0, len(todo), g.batch_size)):
                if stop_after is not None and n >= stop_after:
                    raise KeyboardInterrupt("stopped for a test")
                idx = todo[b : b + g.batch_size]
                prompts = [build_prompt(rows[i]["question"], cfg, shots) for i in idx]
                texts = generate_texts(model, tok, prompts, g, seed=g.seed + idx[0])
                store.append([_judge_row(i, rows[i], cut_at_next_example(t, cfg.template))
                              for i, t in zip(idx, texts, strict=True)])  # fmt: skip
                bar.update(len(idx))
    kept = store.finish(keep=lambda r: r["status"] == "ok")
    counts = {"ok": 0, "disagrees": 0, "unparsed": 0}
    for r in store.done.values():
        counts[r["status"]] += 1
    return {
        "output": str(Path(out).absolute()),
        "questions": len(rows),
        "kept": len(kept),
        "dropped_disagreeing": counts["disagrees"],
        "dropped_unparsed": counts["unparsed"],
        "resumed": store.resumed,
        "config": asdict(cfg),
        "wall_s": round(time.perf_counter() - start, 3),
    }


def _judge_row(i: int, row: dict, text: str) -> dict:
    out = {"index": i, "question": row["question"], "teacher_output": text}
    parsed = parse_answer(text)
    if parsed is None or not parsed[0]:
        return {**out, "status": "unparsed"}
    rationale, answer = parsed
    gold = row.get("answer")
    status = "ok"
    if gold is not None and not answers_agree(answer, str(gold)):
        status = "disagrees"
    return {**out, "status": status, "rationale": rationale, "teacher_answer": answer,
            "answer": str(gold) if gold is not None else answer}  # fmt: skip
