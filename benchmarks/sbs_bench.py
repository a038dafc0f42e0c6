"""Distilling step-by-step in miniature: label-only vs step-by-step students on 25/50/100% data.

A generated two-step word problem ("Ann has a pens. She gets b more and loses c. ...", answer
a + b − c) with gold rationales ("a + b = s. s - c = r."). A teacher (a tiny Llama trained on
gold rationale + answer) writes rationales for the training questions (`distill rationales`,
few-shot, disagreeing ones dropped); students of the same tiny size are trained with labels only
(``--alpha 1``: the rationale task gets no weight) or step-by-step (``--alpha 0.5``) on the
first 25/50/100% of those rows, and scored with `eval accuracy` on held-out questions.

    python benchmarks/sbs_bench.py --out /tmp/sbs-bench
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from weightsmith.distill import DistillConfig, LossConfig, distill
from weightsmith.distill.generate import GenerateConfig
from weightsmith.distill.rationales import RationaleConfig, generate_rationales
from weightsmith.evaluate.accuracy import evaluate_accuracy
from weightsmith.testing import build_tiny_model

NAMES = ["Ann", "Tom", "Sue", "Ben", "Mia", "Sam"]
THINGS = ["pens", "apples", "cards", "shells", "books", "balls"]


def problem(rng: random.Random) -> dict:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    c = rng.randint(0, a + b)
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    q = f"{n} has {a} {t}. {n} gets {b} more and loses {c}. How many {t} now?"
    s = a + b
    return {
        "question": q,
        "answer": str(s - c),
        "rationale": f"{a} + {b} = {s}. {s} - {c} = {s - c}.",
    }


def write(path: Path, rows: list[dict], keys: tuple[str, ...]) -> Path:
    path.write_text("".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/sbs-bench"))
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--student-epochs", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    teacher_rows = [problem(rng) for _ in range(args.train)]  # the teacher's own labelled data
    train = [problem(rng) for _ in range(args.train)]  # the students' questions (+ labels)
    test = [problem(rng) for _ in range(args.test)]
    tmpl = "Question: {question}\nAnswer: Let's think step by step."
    # teacher: a 2-layer tiny llama trained on gold "rationale + The answer is r."
    tdata = args.out / "teacher.jsonl"
    tdata.write_text("".join(json.dumps({"prompt": tmpl.format(question=r["question"]),
                                         "completion": f" {r['rationale']} The answer is "
                                         f"{r['answer']}."}) + "\n" for r in teacher_rows))  # fmt: skip
    base = build_tiny_model(args.out / "base", "llama", seed=args.seed, hidden_size=96,
                            intermediate_size=192, num_hidden_layers=2)  # fmt: skip
    tcfg = DistillConfig(method="sft", loss=LossConfig(alpha=1.0), steps=args.teacher_steps,
                         lr=3e-3, batch_size=16, seq_len=160, seed=args.seed)  # fmt: skip
    distill(None, base, tdata, args.out / "teacher", tcfg, progress=False)
    write(args.out / "test.jsonl", test, ("question", "answer"))
    t_acc = evaluate_accuracy(args.out / "teacher", args.out / "test.jsonl",
                              template=tmpl, max_new_tokens=48)  # fmt: skip
    # teacher rationales for the students' questions (gold label known: disagreeing dropped)
    write(args.out / "tasks.jsonl", train, ("question", "answer"))
    info = generate_rationales(args.out / "teacher", args.out / "tasks.jsonl",
                               args.out / "rationales.jsonl",
                               RationaleConfig(template=tmpl, generation=GenerateConfig(
                                   max_new_tokens=48, batch_size=32)), progress=False)  # fmt: skip
    rows = [json.loads(x) for x in (args.out / "rationales.jsonl").read_text().splitlines()]
    if len(rows) < 4:
        raise SystemExit(
            f"the teacher (accuracy {t_acc['accuracy']:.3f}) kept only {len(rows)} rationales; "
            "train it longer (--teacher-steps)"
        )
    results = []
    for frac in (0.25, 0.5, 1.0):
        part = rows[: max(1, int(len(rows) * frac))]
        data = write(args.out / f"r{frac}.jsonl", part, ("question", "answer", "rationale"))
        for name, alpha in (("label-only", 1.0), ("step-by-step", 0.5)):
            cfg = DistillConfig(method="step-by-step", sbs_alpha=alpha, epochs=args.student_epochs,
                                lr=3e-3, batch_size=16, seq_len=160, seed=args.seed)  # fmt: skip
            out = args.out / f"{name}-{frac}"
            student = build_tiny_model(args.out / "sbase", "llama", seed=args.seed + 1,
                                       hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2) if not (args.out / "sbase").exists() \
                else args.out / "sbase"  # fmt: skip
            res = distill(None, student, data, out, cfg, progress=False)
            acc = evaluate_accuracy(out, args.out / "test.jsonl")["accuracy"]
            results.append({"fraction": frac, "rows": len(part), "method": name,
                            "accuracy": acc, "steps": res.steps})  # fmt: skip
            print(json.dumps(results[-1]), flush=True)
    summary = {"teacher_accuracy": t_acc["accuracy"], "rationales": {k: info[k] for k in (
        "questions", "kept", "dropped_disagreeing", "dropped_unparsed")}, "students": results,
        "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (args.out / "result.json").write_text(json.dumps(summary, indent=2))
    print(f"teacher accuracy {t_acc['accuracy']:.3f}; rationales kept {info['kept']}/"
          f"{info['questions']}")  # fmt: skip
    print("| data | label-only | step-by-step |\n|---|---|---|")
    for frac in (0.25, 0.5, 1.0):
        acc = {r["method"]: r["accuracy"] for r in results if r["fraction"] == frac}
        print(f"| {int(frac * 100)}% | {acc['label-only']:.3f} | {acc['step-by-step']:.3f} |")
    print(f"wall {summary['wall_s']} s")


if __name__ == "__main__":
    main()
