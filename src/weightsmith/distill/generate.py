"""Batched generation to JSON lines, resumable: ``distill generate`` (teacher-written
completions for dSFT), and the building block of ``distill feedback`` and ``distill rationales``.

Rows are appended to ``OUT.partial`` batch by batch (flushed and fsynced), each tagged with the
index of its input row; a re-run skips the indices already there and, once every row is done,
renames the file to ``OUT``. So an interrupted run leaves no ``OUT``, only a partial file that the
next run continues. Sampling is seeded per batch start, so a resumed run with the same
``--batch-size`` writes what an uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from weightsmith.errors import ConfigError, OutputError


@dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")


def read_jsonl(path: str | os.PathLike[str], required: Iterable[str]) -> list[dict]:
    """Rows of a JSON-lines file, each an object with string values for ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    rows = []
    keys = list(required)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in keys):
            raise ConfigError(f"{path}:{lineno}: expected an object with string {keys}")
        rows.append(obj)
    if not rows:
        raise ConfigError(f"{path}: no records")
    return rows


@torch.no_grad()
def generate_texts(model, tok, prompts: list[str], cfg: GenerateConfig, seed: int) -> list[str]:
    """Continue each prompt (left-padded batch); greedy at temperature 0, else sampled."""
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
        sample = cfg.temperature > 0
        torch.manual_seed(seed)
        gen = model.generate(
            **enc,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=sample,
            temperature=cfg.temperature if sample else None,
            top_p=cfg.top_p if sample else None,
            top_k=0 if sample else None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,  # stop at the tokenizer's EOS even when the model's
        )  # generation_config names none
    finally:
        tok.padding_side = side
    new = gen[:, enc["input_ids"].shape[1] :]
    return [tok.decode(row, skip_special_tokens=True) for row in new]


class ResumableJsonl:
    """Append-only ``OUT.partial`` keyed by ``index``; :meth:`finish` renames it to ``OUT``."""

    def __init__(self, out: str | os.PathLike[str], *, force: bool = False) -> None:
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        if self.out.exists() and not force:
            raise OutputError(f"{self.out} exists (use --force to overwrite)")
        if not self.out.parent.is_dir():
            raise OutputError(f"{self.out.parent}: output directory does not exist")
        self.done: dict[int, dict] = {}
        if self.partial.is_file():
            for line in self.partial.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a kill: drop it, it is redone
                self.done[int(row["index"])] = row
            # rewrite without a torn tail so appends start on a clean line
            self._rewrite()
        self.resumed = len(self.done)

    def _rewrite(self) -> None:
        rows = [self.done[i] for i in sorted(self.done)]
        self.partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                encoding="utf-8")  # fmt: skip

    def append(self, rows: list[dict]) -> None:
        with open(self.partial, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                self.done[int(r["index"])] = r
            f.flush()
            os.fsync(f.fileno())

    def finish(self, keep: Callable[[dict], bool] = lambda r: True) -> list[dict]:
        """Write the kept rows in input order to OUT (atomic rename) and drop the partial."""
        rows = [self.done[i] for i in sorted(self.done) if keep(self.done[i])]
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                       encoding="utf-8")  # fmt: skip
        os.replace(tmp, self.out)
        self.partial.unlink(missing_ok=True)
        return rows


def generate_file(
    teacher: str | os.PathLike[str],
    prompts: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: GenerateConfig,
    *,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    stop_after: int | None = None,  # tests: simulate an interruption after this many batches
) -> dict:
    """Write ``{"index", "prompt", "completion"}`` rows (teacher completions) to ``out``."""
    from weightsmith.distill.cache import _device
    from weightsmith.distill.models import load_model, load_tokenizer

    start = time.perf_counter()
    rows = read_jsonl(prompts, ["prompt"])
    store = ResumableJsonl(out, force=force)
    todo = [i for i in range(len(rows)) if i not in store.done]
    new = 0
    if todo:
        dev = _device(device)
        tok = load_tokenizer(teacher)
        model = load_model(teacher, dev)
        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="generating",
                   unit="prompt", disable=not progress)  # fmt: skip
        with bar:
            for n, b in enumerate(range(0, len(todo), cfg.batch_size)):
                if stop_after is not None and n >= stop_after:
                    raise KeyboardInterrupt("stopped for a test")
                idx = todo[b : b + cfg.batch_size]
                texts = generate_texts(model, tok, [rows[i]["prompt"] for i in idx], cfg,
                                       seed=cfg.seed + idx[0])  # fmt: skip
                store.append([{"index": i, "prompt": rows[i]["prompt"], "completion": t}
                              for i, t in zip(idx, texts, strict=True)])  # fmt: skip
                new += len(idx)
                bar.update(len(idx))
    written = store.finish()
    return {
        "output": str(store.out.absolute()),
        "rows": len(written),
        "generated": new,
        "resumed": store.resumed,
        "config": asdict(cfg),
        "wall_s": round(time.perf_counter() - start, 3),
    }
