"""On-policy GKD benchmark: stories260K teacher -> the same model with every other layer dropped.

Trains equal steps at ``--lmbda 0`` (off-policy KD) and ``--lmbda 0.5`` (half the micro-batches
sampled by the student), both with TRL's generalized JSD (``--loss gkd --beta 0.5 --alpha 0
--temperature 1``, as TRL's GKDTrainer trains), for each seed, then measures KL(teacher ‖
student) per token on held-out TinyStories validation text in two ways: (1) teacher-forced on
the text (windows of 256), (2) on the student's own sampled continuations of held-out prompts
(the distribution GKD targets). Prints the mean over seeds.

    python benchmarks/gkd_bench.py --steps 150 --seeds 0,1 --out /tmp/gkd.json

Needs ../shared (or WEIGHTSMITH_SHARED); exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill_bench import drop_layers, held_out, num_layers
from weightsmith.core.models import load_model, load_tokenizer
from weightsmith.core.training.data import Example, collate
from weightsmith.core.training.losses import IGNORE_INDEX, kl_divergence, shift_for_next_token
from weightsmith.distill import DistillConfig, LossConfig, distill
from weightsmith.distill.gkd import RolloutSettings, student_rollouts
from weightsmith.testing import shared_model, shared_text


@torch.no_grad()
def on_policy_kl(student: Path, teacher: Path, valid: Path, a) -> float:
    """KL(teacher ‖ student) per generated token over the student's samples (seeded) continuing
    the first ``--prompt-tokens`` of held-out windows."""
    tok = load_tokenizer(student)
    s_model, t_model = (
        load_model(student, torch.device("cpu")),
        load_model(teacher, torch.device("cpu")),
    )
    ids = tok(valid.read_text(encoding="utf-8")[:200_000])["input_ids"]
    prompts = [Example(tuple(ids[i : i + a.prompt_tokens + 1]), tuple(ids[i : i + a.prompt_tokens
               + 1])) for i in range(0, a.eval_prompts * 256, 256)]  # fmt: skip
    cfg = RolloutSettings(a.max_new_tokens, 1.0, a.prompt_tokens, a.seq_len)
    kl_sum, n = 0.0, 0
    for b in range(0, len(prompts), 16):
        rolls = student_rollouts(s_model, prompts[b : b + 16], cfg, pad_id=tok.pad_token_id,
                                 eos_id=tok.eos_token_id, seed=1000 + b)  # fmt: skip
        batch = collate(rolls, tok.pad_token_id)
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s_logits, labels = shift_for_next_token(s_model(**kw).logits, batch["labels"])
        t_logits = t_model(**kw).logits[:, :-1]
        mask = labels != IGNORE_INDEX
        kl = kl_divergence(F.log_softmax(t_logits[mask], -1), F.log_softmax(s_logits[mask], -1))
        kl_sum += float(kl.sum())
        n += int(mask.sum())
    return kl_sum / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lmbdas", default="0,0.5")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--train-chars", type=int, default=300_000)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    teacher, train_src = shared_model("stories260K"), shared_text("tinystories_train.txt")
    valid = shared_text("tinystories_valid.txt")
    if teacher is None or train_src is None or valid is None:
        raise SystemExit("needs stories260K and ../shared/data/tinystories_{train,valid}.txt")
    work = Path(tempfile.mkdtemp(prefix="gkd-bench-"))
    train = work / "train.txt"
    train.write_text(train_src.read_text(encoding="utf-8")[: a.train_chars], encoding="utf-8")
    keep = list(range(0, num_layers(teacher), 2))
    student = drop_layers(teacher, work / "student", keep=keep)
    runs: dict[str, list[dict]] = {}
    for lmbda in [float(x) for x in a.lmbdas.split(",")]:
        for seed in [int(x) for x in a.seeds.split(",")]:
            cfg = DistillConfig(
                loss=LossConfig(loss="gkd", beta=0.5, alpha=0.0, temperature=1.0),
                steps=a.steps, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, seed=seed,
                lmbda=lmbda, gen_max_new_tokens=a.max_new_tokens, gen_temperature=1.0,
                gen_prompt_tokens=a.prompt_tokens,
            )  # fmt: skip
            out = work / f"l{lmbda}-s{seed}"
            res = distill(teacher, student, train, out, cfg, progress=False)
            row = {"seed": seed, "train_wall_s": res.wall_s, "last_loss": res.losses[-1],
                   "heldout_text_kl": held_out(out, teacher, valid, a.eval_tokens)["kl_to_teacher"],
                   "on_policy_kl": on_policy_kl(out, teacher, valid, a), "notes": res.notes}  # fmt: skip
            print(f"lmbda {lmbda}", json.dumps(row), flush=True)
            runs.setdefault(f"lmbda {lmbda}", []).append(row)
    summary = {
        "settings": vars(a) | {"out": str(a.out) if a.out else None, "keep_layers": keep},
        "student_before": {"heldout_text_kl": held_out(student, teacher, valid, a.eval_tokens)[
            "kl_to_teacher"], "on_policy_kl": on_policy_kl(student, teacher, valid, a)},
        "mean_over_seeds": {k: {m: statistics.mean(r[m] for r in rows) for m in
                                ("heldout_text_kl", "on_policy_kl", "train_wall_s")}
                            for k, rows in runs.items()},
        "runs": runs,
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
