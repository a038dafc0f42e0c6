"""Build weightsmith's built-in calibration mix (src/weightsmith/core/data/calibration-mix.txt.gz).

    python data/calibration-mix/build.py

Domains (see README.md here for provenance and licence): hand-written stories, explanations,
chat/dialogue and non-English text (the *.txt files next to this script), generated math word
problems with worked solutions, generated children's stories, generated structured data, and
weightsmith's own Python source and Markdown docs. Documents are interleaved in proportion to
each domain's size, so any prefix of the mix (calibration reads the first samples × seq_len
tokens) is as diverse as the whole. The output is deterministic (fixed seeds, gzip mtime 0).
"""

from __future__ import annotations

import gzip
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT = REPO / "src" / "weightsmith" / "core" / "data" / "calibration-mix.txt.gz"
sys.path.insert(0, str(HERE))

from generate import math_problems, stories, structured  # noqa: E402

HAND_WRITTEN = ["stories", "explanations", "chat", "multilingual", "builtin_v0"]
BUDGET = {"math": 75_000, "generated_stories": 40_000, "structured": 28_000,
          "code": 95_000, "docs": 60_000}  # fmt: skip


def hand_written(name: str) -> list[str]:
    text = (HERE / f"{name}.txt").read_text(encoding="utf-8")
    sep = "\n=====\n" if "\n=====\n" in text else "\n\n"
    return [d.strip() for d in text.split(sep) if d.strip()]


def take(pieces: list[str], budget: int, rng: random.Random) -> list[str]:
    """A seeded sample of ``pieces`` of about ``budget`` characters, in a seeded order."""
    pieces = list(pieces)
    rng.shuffle(pieces)
    out, size = [], 0
    for p in pieces:
        if size >= budget:
            break
        out.append(p)
        size += len(p)
    return out


def code_files(rng: random.Random) -> list[str]:
    files = sorted((REPO / "src" / "weightsmith").rglob("*.py"))
    return take([f.read_text() for f in files if 1500 < f.stat().st_size < 12_000],
                BUDGET["code"], rng)  # fmt: skip


def doc_sections(rng: random.Random) -> list[str]:
    sections = []
    for f in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = f.read_text()
        sections += [("## " + s if i else s).strip() for i, s in enumerate(text.split("\n## "))]
    return take([s for s in sections if 400 < len(s) < 8000], BUDGET["docs"], rng)


def interleave(domains: dict[str, list[str]]) -> list[str]:
    """Documents of all domains, each next one from the domain furthest behind its share."""
    total = {k: sum(map(len, v)) for k, v in domains.items()}
    pos = {k: 0 for k in domains}
    done = {k: 0 for k in domains}
    out = []
    while any(pos[k] < len(v) for k, v in domains.items()):
        k = min((k for k in domains if pos[k] < len(domains[k])), key=lambda k: done[k] / total[k])
        doc = domains[k][pos[k]]
        out.append(doc)
        pos[k] += 1
        done[k] += len(doc)
    return out


def main() -> None:
    domains = {name: hand_written(name) for name in HAND_WRITTEN}
    domains["math"] = math_problems(random.Random(1), BUDGET["math"])
    domains["generated_stories"] = stories(random.Random(2), BUDGET["generated_stories"])
    domains["structured"] = structured(random.Random(3), BUDGET["structured"])
    domains["code"] = code_files(random.Random(4))
    domains["docs"] = doc_sections(random.Random(5))
    text = "\n\n".join(interleave(domains)) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.encode("utf-8"))
    for k, v in domains.items():
        print(f"{k:18} {len(v):4} docs {sum(map(len, v)):8} chars")
    print(f"total {len(text)} chars -> {OUT.relative_to(REPO)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
