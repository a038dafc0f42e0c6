"""Distilling step-by-step in miniature: label-only vs step-by-step students on 25/50/100% data.

A generated two-step word problem ("Ann has 5 pens, gets 3, loses 2. How many now?",
answer a + b − c) with gold rationales ("5+3=8, 8-2=6."). The tokenizer is a byte-level BPE
trained on the task's text with every digit split off, so numbers can be copied and added digit
by digit by a tiny model. A teacher (a tiny Llama trained with ``--method sft`` on gold
rationale + "The answer is r.") writes rationales for the students' unlabeled training
questions (`distill rationales`, greedy; rationales whose answer disagrees with the gold label
are dropped); smaller students are trained with labels only (``--alpha 1``: the rationale task
gets no weight) or step-by-step (``--alpha 0.5``) on the first 25/50/100% of the kept rows, for
the same number of optimizer steps at every data size, and scored with `eval accuracy` (greedy,
``predict:`` prompt) on held-out questions.

    python benchmarks/sbs_bench.py --out /tmp/sbs-bench
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import torch

from weightsmith.distill import DistillConfig, LossConfig, distill
from weightsmith.distill.generate import GenerateConfig
from weightsmith.distill.rationales import RationaleConfig, generate_rationales
from weightsmith.evaluate.accuracy import evaluate_accuracy
from weightsmith.testing import build_tiny_model

NAMES = ["Ann", "Tom", "Sue", "Ben", "Mia", "Sam"]
THINGS = ["pens", "apples", "cards", "shells", "books", "balls"]
TEMPLATE = "Q: {question}\nA:"  # the teacher's prompt, in training and in `distill rationales`
FRACTIONS = (0.25, 0.5, 1.0)
ARMS = (("label-only", 1.0), ("step-by-step", 0.5))


def problem(rng: random.Random, max_operand: int) -> dict:
    """One question with its gold answer and gold two-step rationale."""
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    s = a + b
    c = rng.randint(0, s)
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    return {
        "question": f"{n} has {a} {t}, gets {b}, loses {c}. How many now?",
        "answer": str(s - c),
        "rationale": f"{a}+{b}={s}, {s}-{c}={s - c}.",
    }


def task_tokenizer(seed: int, max_operand: int):
    """A byte-level BPE trained on the task's text, with every digit split off on its own.

    Words ("Ġgets", "Ġanswer") become single tokens and each digit is its own token, so a
    tiny model can copy numbers and learn the digit-wise arithmetic (a GPT-2-style tokenizer
    fuses "14" into odd pieces).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(10_000 + seed)
    corpus = []
    for r in (problem(rng, max_operand) for _ in range(300)):
        corpus += [TEMPLATE.format(question=r["question"]) + f" {r['rationale']} The answer is "
                   f"{r['answer']}.", f"predict: {r['question']}\n {r['answer']}",
                   f"explain: {r['question']}\n {r['rationale']}"]  # fmt: skip
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|pad|>")  # fmt: skip


def tiny_llama(out: Path, tok, hidden: int, layers: int, seed: int) -> Path:
    """A seeded tiny Llama with the task tokenizer."""
    build_tiny_model(out, "llama", seed=seed, vocab_size=len(tok), with_tokenizer=False,
                     hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    tok.save_pretrained(out)
    return out


def write(path: Path, rows: list[dict], keys: tuple[str, ...]) -> Path:
    path.write_text("".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows))
    return path


def train_teacher(args, teacher_rows: list[dict], test: Path) -> tuple[Path, list[dict]]:
    """SFT on gold rationale + answer in rounds, held-out accuracy after each (greedy)."""
    data = args.out / "teacher.jsonl"
    data.write_text("".join(json.dumps({"prompt": TEMPLATE.format(question=r["question"]),
                                        "completion": f" {r['rationale']} The answer is "
                                        f"{r['answer']}."}) + "\n" for r in teacher_rows))  # fmt: skip
    model = tiny_llama(
        args.out / "teacher-0", args.tok, args.teacher_hidden, args.teacher_layers, args.seed
    )
    curve = []
    per_round = max(1, args.teacher_steps // args.teacher_rounds)
    for k in range(1, args.teacher_rounds + 1):
        # each round: warmup + cosine decay to 10% (a restart schedule); lr halves per round
        cfg = DistillConfig(method="sft", loss=LossConfig(alpha=1.0), steps=per_round,
                            lr=args.teacher_lr / 2 ** (k - 1), batch_size=32, seq_len=160,
                            min_lr_ratio=0.1, seed=args.seed + k)  # fmt: skip
        res = distill(None, model, data, args.out / f"teacher-{k}", cfg, progress=False)
        model = args.out / f"teacher-{k}"
        acc = evaluate_accuracy(model, test, template=TEMPLATE, max_new_tokens=48,
                                batch_size=64)  # fmt: skip
        curve.append({"steps": k * per_round, "loss": round(res.losses[-1], 4),
                      "accuracy": acc["accuracy"]})  # fmt: skip
        print(f"teacher {curve[-1]}", flush=True)
    return model, curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/sbs-bench"))
    ap.add_argument("--max-operand", type=int, default=9)
    ap.add_argument("--teacher-train", type=int, default=20000, help="gold rows for the teacher")
    ap.add_argument("--train", type=int, default=600, help="the students' questions")
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--teacher", type=Path, help="reuse this teacher (from an earlier run)")
    ap.add_argument("--teacher-hidden", type=int, default=96)
    ap.add_argument("--teacher-layers", type=int, default=2)
    ap.add_argument("--teacher-steps", type=int, default=1500)
    ap.add_argument("--teacher-rounds", type=int, default=3)
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument("--student-hidden", type=int, default=64)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--student-steps", type=int, default=1500,
                    help="optimizer steps per student, the same at every data size")  # fmt: skip
    ap.add_argument("--student-lr", type=float, default=3e-3)
    ap.add_argument("--student-batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.teacher is not None and args.teacher.absolute().is_relative_to(args.out.absolute()):
        raise SystemExit("--teacher must live outside --out (which is cleared)")
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    t0 = time.perf_counter()
    args.tok = task_tokenizer(args.seed, args.max_operand)
    rng = random.Random(args.seed)
    teacher_rows = [problem(rng, args.max_operand) for _ in range(args.teacher_train)]
    train = [problem(rng, args.max_operand) for _ in range(args.train)]  # students' questions
    test = [problem(rng, args.max_operand) for _ in range(args.test)]
    test_file = write(args.out / "test.jsonl", test, ("question", "answer"))
    if args.teacher is not None:  # must have been trained by this script with the same args
        teacher = args.teacher
        acc = evaluate_accuracy(teacher, test_file, template=TEMPLATE, max_new_tokens=48)
        curve = [{"steps": None, "loss": None, "accuracy": acc["accuracy"]}]
    else:
        teacher, curve = train_teacher(args, teacher_rows, test_file)
    t_teacher = time.perf_counter() - t0
    # teacher rationales for the students' questions; the gold label only filters them
    write(args.out / "tasks.jsonl", train, ("question", "answer"))
    info = generate_rationales(teacher, args.out / "tasks.jsonl", args.out / "rationales.jsonl",
                               RationaleConfig(template=TEMPLATE, generation=GenerateConfig(
                                   max_new_tokens=48, batch_size=64)), progress=False)  # fmt: skip
    rows = [json.loads(x) for x in (args.out / "rationales.jsonl").read_text().splitlines()]
    gold = {r["question"]: r["rationale"] for r in train}
    same = sum(r["rationale"] == gold[r["question"]] for r in rows)
    print(f"rationales: kept {info['kept']}/{info['questions']}, {same} identical to gold",
          flush=True)  # fmt: skip
    if len(rows) < 8:
        raise SystemExit(f"the teacher kept only {len(rows)} rationales; train it longer")
    results = []
    for seed in range(args.seed, args.seed + args.seeds):
        sbase = tiny_llama(args.out / f"student-base-{seed}", args.tok, args.student_hidden,
                           args.student_layers, seed=1000 + seed)  # fmt: skip
        for frac in FRACTIONS:
            part = rows[: max(1, int(len(rows) * frac))]
            data = write(args.out / f"r{frac}.jsonl", part, ("question", "answer", "rationale"))
            for name, alpha in ARMS:
                cfg = DistillConfig(method="step-by-step", sbs_alpha=alpha,
                                    steps=args.student_steps, lr=args.student_lr,
                                    batch_size=args.student_batch,
                                    seq_len=160, seed=seed)  # fmt: skip
                out = args.out / f"{name}-{frac}-s{seed}"
                res = distill(None, sbase, data, out, cfg, progress=False)
                acc = evaluate_accuracy(out, test_file, max_new_tokens=8, batch_size=64)
                results.append({"seed": seed, "fraction": frac, "rows": len(part),
                                "method": name, "accuracy": acc["accuracy"],
                                "steps": res.steps, "epochs": round(res.steps * args.student_batch / len(part), 1),
                                "last_loss": round(statistics.mean(res.losses[-20:]), 4)})  # fmt: skip
                print(json.dumps(results[-1]), flush=True)
                shutil.rmtree(out)
    summary = {"args": {k: str(v) for k, v in vars(args).items() if k != "tok"}, "teacher_curve": curve,
               "teacher_accuracy": curve[-1]["accuracy"], "teacher_wall_s": round(t_teacher, 1),
               "rationales": {k: info[k] for k in ("questions", "kept", "dropped_disagreeing",
                                                   "dropped_unparsed")} | {"identical_to_gold": same},
               "students": results, "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    (args.out / "result.json").write_text(json.dumps(summary, indent=2))
    print(f"teacher accuracy {curve[-1]['accuracy']:.3f}; rationales kept {info['kept']}/"
          f"{info['questions']}")  # fmt: skip
    print("| data (rows) | label-only | step-by-step |\n|---|---|---|")
    for frac in FRACTIONS:
        cells = []
        for name, _ in ARMS:
            accs = [r["accuracy"] for r in results if r["fraction"] == frac and r["method"] == name]
            each = " / ".join(f"{a:.3f}" for a in accs)
            cells.append(f"{statistics.mean(accs):.3f} ({each})")
        n = next(r["rows"] for r in results if r["fraction"] == frac)
        print(f"| {int(frac * 100)}% ({n}) | {cells[0]} | {cells[1]} |")
    print(f"wall {summary['wall_s']} s")


if __name__ == "__main__":
    main()
