"""Teacher rationales for step-by-step distillation (Hsieh et al. 2023).

The teacher answers each question with a chain of thought ending in "the answer is X"; we parse
X robustly, keep (rationale, answer) and drop — and count — rationales whose answer disagrees
with the gold label (when the task has one) or cannot be parsed. Generation is batched and
resumable (see :mod:`weightsmith.distill.generate`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from weightsmith.core.answers import answers_agree, parse_answer
from weightsmith.core.generation import GenerateConfig
from weightsmith.core.jsonl import read_jsonl
from weightsmith.distill.generate import ResumableJsonl, generate_rows
from weightsmith.errors import ConfigError

DEFAULT_TEMPLATE = "Question: {question}\nAnswer: Let's think step by step."
FEW_SHOT_SEPARATOR = "\n\n"


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
    start = time.perf_counter()
    rows = read_jsonl(data, ["question"])
    shots = [r for r in rows if isinstance(r.get("rationale"), str) and "answer" in r]
    shots = shots[: cfg.few_shot]
    if len(shots) < cfg.few_shot:
        raise ConfigError(f"--few-shot {cfg.few_shot}: {data} has only {len(shots)} rows with "
                          "'rationale' and 'answer'")  # fmt: skip
    store = ResumableJsonl(out, force=force, inputs=(data,))
    todo = [i for i in range(len(rows)) if i not in store.done]

    def to_rows(idx: list[int], texts: list[str]) -> list[dict]:
        return [_judge_row(i, rows[i], cut_at_next_example(t, cfg.template))
                for i, t in zip(idx, texts, strict=True)]  # fmt: skip

    generate_rows(store, teacher, todo, lambda i: build_prompt(rows[i]["question"], cfg, shots),
                  to_rows, cfg.generation, total=len(rows), device=device, progress=progress,
                  stop_after=stop_after, desc="rationales", unit="question")  # fmt: skip
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
