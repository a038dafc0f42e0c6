"""AI feedback (Zephyr / UltraFeedback): candidate models answer each prompt, a judge scores every
answer, and the best answer becomes ``chosen`` and a random lower-scored one ``rejected``.

The judge is a Python function ``score(prompt, completion) -> float`` named as
``module:function`` or ``path/to/file.py:function`` (given explicitly by the user on the command
line, never read from a data file), or ``llm:MODEL_DIR``, a model rating each answer through a
rating prompt (:class:`LlmJudge`). Prompts whose answers all tie at the top are dropped and
counted. All answers and scores are kept next to the output as ``OUT.completions.jsonl`` (written
resumably, so an interrupted run continues where it stopped).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from weightsmith.core.device import select_device
from weightsmith.core.generation import GenerateConfig
from weightsmith.core.jsonl import read_jsonl
from weightsmith.core.models import load_model, load_tokenizer
from weightsmith.distill.generate import ResumableJsonl, generate_rows
from weightsmith.errors import ConfigError
from weightsmith.io.paths import check_file_output

Judge = Callable[[str, str], float]


@dataclass(frozen=True)
class FeedbackConfig:
    k: int = 1  # completions per candidate model per prompt (k > 1 needs --temperature > 0)
    generation: GenerateConfig = field(default_factory=lambda: GenerateConfig(temperature=0.7))
    seed: int = 0  # picks the rejected answer among the lower-scored ones
    version: int = 1

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1, got {self.k}")
        if self.k > 1 and self.generation.temperature == 0:
            raise ConfigError(
                "--k above 1 with greedy decoding repeats one answer; set --temperature"
            )


RATING_TEMPLATE = (
    "Rate the answer to the request from 1 (bad) to 9 (excellent).\n"
    "Request: {prompt}\nAnswer: {completion}\nRating (1-9):"
)


class LlmJudge:
    """A model as judge through a rating prompt: the score is the expected rating
    Σ_d d·p(d) over the single-token digits 1..9 at the position after the prompt (renormalized
    over those digits; deterministic, no sampling, no parsing of free text)."""

    def __init__(self, model_dir: str | os.PathLike[str], template: str = RATING_TEMPLATE,
                 device: str = "auto") -> None:  # fmt: skip
        self.tok = load_tokenizer(model_dir)
        self.digits = []
        for d in range(1, 10):
            ids = self.tok(str(d), add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ConfigError(f"--judge llm:{model_dir}: digit {d} is not one token")
            self.digits.append(ids[0])
        self.template = template
        self.model = load_model(model_dir, select_device(device))

    def __call__(self, prompt: str, completion: str) -> float:
        import torch

        text = self.template.format(prompt=prompt, completion=completion)
        ids = self.tok(text, return_tensors="pt")["input_ids"].to(self.model.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -1].float()
        p = torch.softmax(logits[self.digits], dim=-1)
        return float((p * torch.arange(1, 10, dtype=p.dtype, device=p.device)).sum())


def load_judge(spec: str) -> Judge:
    """``module:function``, ``file.py:function`` or ``llm:MODEL_DIR`` -> the scoring function."""
    if spec.startswith("llm:"):
        return LlmJudge(spec[4:])
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"--judge {spec!r}: expected module:function or file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"--judge {spec!r}: {path} not found")
            loader_spec = importlib.util.spec_from_file_location(f"_ws_judge_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise ConfigError(f"--judge {spec!r}: cannot import {target} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--judge {spec!r}: {target} has no function {name!r}")
    _check_judge_signature(spec, fn)
    return fn


def check_feedback_output(
    prompts: str | os.PathLike[str], out: str | os.PathLike[str], force: bool
) -> Path:
    """Refuse an OUT that is the prompts file, or exists without ``force`` (before any work,
    and before a judge file is imported)."""
    out = Path(out)
    check_file_output(out, [Path(prompts)], force)
    return out


def _check_judge_signature(spec: str, fn: Judge) -> None:
    try:
        inspect.signature(fn).bind("prompt", "completion")
    except TypeError:
        raise ConfigError(
            f"--judge {spec!r}: must be a function score(prompt, completion) -> float"
        ) from None
    except ValueError:  # builtins without a signature: trust them
        pass


def pick_pair(scores: list[float], rng: random.Random) -> tuple[int, int] | None:
    """(chosen, rejected): the first best-scored answer and a random strictly lower one; None if
    no answer scores below the best (a tie)."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    lower = [i for i, s in enumerate(scores) if s < scores[best]]
    if not lower:
        return None
    return best, rng.choice(lower)


def collect_feedback(
    prompts: str | os.PathLike[str],
    candidates: list[str],
    judge: Judge,
    out: str | os.PathLike[str],
    cfg: FeedbackConfig,
    *,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Generate, judge and pair; writes ``out`` (prefs) and ``out.completions.jsonl``."""
    start = time.perf_counter()
    if not candidates:
        raise ConfigError("--candidates is empty")
    out = check_feedback_output(prompts, out, force)
    rows = read_jsonl(prompts, ["prompt"])
    store = ResumableJsonl(out.with_name(out.name + ".completions.jsonl"), force=True)
    select_device(device)  # an unknown --device fails before any work
    generated = 0
    for m, cand in enumerate(candidates):  # one candidate model resident at a time
        generated += _answer_with(m, cand, rows, judge, store, cfg, device, progress)
    answers = store.finish()
    pairs, ties = _preference_pairs(rows, answers, cfg.seed)
    n = len(rows)
    if not pairs:
        raise ConfigError(f"every one of the {n} prompts tied under the judge; no pairs to write")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs),
                   encoding="utf-8")  # fmt: skip
    os.replace(tmp, out)
    wins: dict[str, int] = {}
    for x in pairs:
        wins[x["chosen_model"]] = wins.get(x["chosen_model"], 0) + 1
    return {
        "output": str(out.absolute()),
        "completions": str(store.out.absolute()),
        "prompts": n,
        "pairs": len(pairs),
        "ties_dropped": ties,
        "generated": generated,
        "chosen_wins": wins,
        "mean_score": {
            c: _mean([a["score"] for a in answers if a["model"] == c]) for c in candidates
        },
        "config": asdict(cfg),
        "wall_s": round(time.perf_counter() - start, 3),
    }


def _answer_with(m: int, cand: str, rows: list[dict], judge: Judge, store: ResumableJsonl,
                 cfg: FeedbackConfig, device: str, progress: bool) -> int:  # fmt: skip
    """Candidate ``m`` answers every prompt ``k`` times (skipping stored answers), judged."""
    n, k = len(rows), cfg.k
    jobs = [(m * n + p) * k + j for p in range(n) for j in range(k)]
    todo = [i for i in jobs if i not in store.done]

    def judged(idx: list[int], texts: list[str]) -> list[dict]:
        new = []
        for i, text in zip(idx, texts, strict=True):
            p = (i // k) % n
            score = float(judge(rows[p]["prompt"], text))
            if math.isnan(score):
                raise ConfigError(f"--judge returned NaN for prompt {p}")
            new.append({"index": i, "prompt_index": p, "model": cand, "sample": i % k,
                        "completion": text, "score": score})  # fmt: skip
        return new

    return generate_rows(store, cand, todo, lambda i: rows[(i // k) % n]["prompt"], judged,
                         cfg.generation, total=len(jobs), device=device, progress=progress,
                         desc=f"candidate {m + 1}", unit="answer")  # fmt: skip


def _preference_pairs(rows: list[dict], answers: list[dict], seed: int) -> tuple[list[dict], int]:
    """(chosen = best-scored, rejected = a seeded pick among the lower-scored) per prompt; ties."""
    by_prompt: dict[int, list[dict]] = {}
    for a in answers:
        by_prompt.setdefault(a["prompt_index"], []).append(a)
    rng = random.Random(seed)
    pairs, ties = [], 0
    for p in range(len(rows)):
        group = by_prompt.get(p, [])
        pick = pick_pair([a["score"] for a in group], rng) if len(group) > 1 else None
        if pick is None:
            ties += 1
            continue
        c, r = group[pick[0]], group[pick[1]]
        pairs.append({"prompt": rows[p]["prompt"], "chosen": c["completion"],
                      "rejected": r["completion"], "score_chosen": c["score"],
                      "score_rejected": r["score"], "chosen_model": c["model"],
                      "rejected_model": r["model"]})  # fmt: skip
    return pairs, ties


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
