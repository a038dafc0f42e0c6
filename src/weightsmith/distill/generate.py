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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from weightsmith.core.device import select_device
from weightsmith.core.generation import GenerateConfig, generate_texts
from weightsmith.core.jsonl import read_jsonl
from weightsmith.core.models import load_model, load_tokenizer
from weightsmith.io.paths import check_file_output


class ResumableJsonl:
    """Append-only ``OUT.partial`` keyed by ``index``; :meth:`finish` renames it to ``OUT``."""

    def __init__(
        self, out: str | os.PathLike[str], *, force: bool = False, inputs: tuple = ()
    ) -> None:
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        check_file_output(self.out, [Path(p) for p in inputs], force)
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
    start = time.perf_counter()
    rows = read_jsonl(prompts, ["prompt"])
    store = ResumableJsonl(out, force=force, inputs=(prompts,))
    todo = [i for i in range(len(rows)) if i not in store.done]

    def to_rows(idx: list[int], texts: list[str]) -> list[dict]:
        return [{"index": i, "prompt": rows[i]["prompt"], "completion": t}
                for i, t in zip(idx, texts, strict=True)]  # fmt: skip

    new = generate_rows(store, teacher, todo, lambda i: rows[i]["prompt"], to_rows, cfg,
                        total=len(rows), device=device, progress=progress, stop_after=stop_after,
                        desc="generating", unit="prompt")  # fmt: skip
    written = store.finish()
    return {
        "output": str(store.out.absolute()),
        "rows": len(written),
        "generated": new,
        "resumed": store.resumed,
        "config": asdict(cfg),
        "wall_s": round(time.perf_counter() - start, 3),
    }


def generate_rows(
    store: ResumableJsonl,
    model_dir: str | os.PathLike[str],
    todo: list[int],
    prompt_of: Callable[[int], str],
    to_rows: Callable[[list[int], list[str]], list[dict]],
    cfg: GenerateConfig,
    *,
    total: int,
    device: str = "auto",
    progress: bool = True,
    stop_after: int | None = None,  # tests: simulate an interruption after this many batches
    desc: str = "generating",
    unit: str = "prompt",
) -> int:
    """Generate for the job indices ``todo`` batch by batch (seeded by each batch's first index)
    and append ``to_rows(indices, texts)`` to ``store``; the number of jobs generated."""
    if not todo:
        return 0
    dev = select_device(device)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dev)
    bar = tqdm(total=total, initial=total - len(todo), desc=desc, unit=unit,
               disable=not progress)  # fmt: skip
    with bar:
        for n, b in enumerate(range(0, len(todo), cfg.batch_size)):
            if stop_after is not None and n >= stop_after:
                raise KeyboardInterrupt("stopped for a test")
            idx = todo[b : b + cfg.batch_size]
            texts = generate_texts(model, tok, [prompt_of(i) for i in idx], cfg,
                                   seed=cfg.seed + idx[0])  # fmt: skip
            store.append(to_rows(idx, texts))
            bar.update(len(idx))
    return len(todo)
