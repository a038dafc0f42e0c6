"""Zephyr in miniature: dSFT -> AI feedback (a deterministic, checkable judge) -> dDPO.

Models (all share one tokenizer, from ../shared/models):
- teacher: ``stories260K`` (TinyStories) writes completions of story openings (dSFT data);
- student: ``stories260K-shakespeare`` is trained on them with ``--method sft`` (dSFT);
- feedback: the dSFT student and the teacher each sample ``k`` answers per training prompt; the
  judge counts cheerful words (:func:`cheer`) minus sad ones; best vs a random lower one;
- dDPO: the dSFT student trained with DPO (β = 0.1) against itself as the reference.

Reported: held-out reward accuracy/margin, and on held-out prompts (never used for training)
the judge's mean score of the dSFT and the DPO student's greedy answers and the DPO student's
win/tie/loss count against the dSFT student.

    python benchmarks/zephyr_bench.py --out /tmp/zephyr-bench
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import torch

from weightsmith.core.generation import GenerateConfig, generate_texts
from weightsmith.core.models import load_model, load_tokenizer
from weightsmith.distill import DistillConfig, LossConfig, distill
from weightsmith.distill.dpo import DpoSettings
from weightsmith.distill.feedback import FeedbackConfig, collect_feedback
from weightsmith.distill.generate import generate_file
from weightsmith.testing import shared_model, shared_text

POSITIVE = {"happy", "smile", "smiled", "smiling", "fun", "love", "loved", "laugh", "laughed",
            "friend", "friends", "play", "played", "good", "nice", "kind", "glad", "hug"}  # fmt: skip
NEGATIVE = {"sad", "cry", "cried", "angry", "scared", "hurt", "bad", "mad"}


def cheer(prompt: str, completion: str) -> float:
    """The judge: cheerful words minus sad words in the completion (case-insensitive)."""
    words = re.findall(r"[a-z]+", completion.lower())
    return float(sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words))


def story_prompts(path: Path, n: int, words: int = 6) -> list[str]:
    """Openings of distinct stories: the first ``words`` words of each non-empty line."""
    out, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        ws = line.split()
        if len(ws) < 20:
            continue
        p = " ".join(ws[:words])
        if p not in seen:
            seen.add(p)
            out.append(p)
        if len(out) == n:
            break
    return out


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def judge_model(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[float]:
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, torch.device("cpu"))
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=16)
    texts = []
    for b in range(0, len(prompts), 16):
        texts += generate_texts(model, tok, prompts[b : b + 16], cfg, seed=0)
    return [cheer(p, t) for p, t in zip(prompts, texts, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/zephyr-bench"))
    ap.add_argument("--train-prompts", type=int, default=64)
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--dpo-steps", type=int, default=40)
    ap.add_argument("--dpo-lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="Delete --out first (no resuming).")
    args = ap.parse_args()
    teacher, student = shared_model("stories260K"), shared_model("stories260K-shakespeare")
    text = shared_text("tinystories_train.txt")
    if teacher is None or student is None or text is None:
        raise SystemExit("needs ../shared (stories260K, stories260K-shakespeare, TinyStories)")
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)  # generation steps resume from .partial files
    t0 = time.perf_counter()
    prompts = story_prompts(text, args.train_prompts + args.eval_prompts)
    train_p, eval_p = prompts[: args.train_prompts], prompts[args.train_prompts :]
    train_file = write_prompts(args.out / "prompts_train.jsonl", train_p)

    # 1. dSFT: the teacher writes completions, the student trains on them
    gen = GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=16)
    generate_file(teacher, train_file, args.out / "sft.jsonl", gen, progress=False, force=True)
    sft_cfg = DistillConfig(method="sft", loss=LossConfig(alpha=1.0), steps=args.sft_steps,
                            lr=2e-3, batch_size=16, seq_len=64, seed=args.seed)  # fmt: skip
    sft = distill(None, student, args.out / "sft.jsonl", args.out / "student-sft", sft_cfg,
                  progress=False, force=True)  # fmt: skip
    # 2. AI feedback: dSFT student and teacher each sample k answers; the judge ranks them
    fb_cfg = FeedbackConfig(k=args.k, seed=args.seed, generation=GenerateConfig(
        max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=16, seed=args.seed))  # fmt: skip
    fb = collect_feedback(train_file, [str(args.out / "student-sft"), str(teacher)], cheer,
                          args.out / "prefs.jsonl", fb_cfg, progress=False, force=True)  # fmt: skip
    # 3. dDPO against the dSFT model as reference
    dpo_cfg = DistillConfig(method="dpo", steps=args.dpo_steps, lr=args.dpo_lr, batch_size=8,
                            seq_len=64, seed=args.seed,
                            dpo=DpoSettings(beta=0.1, eval_fraction=0.2))  # fmt: skip
    dpo = distill(None, args.out / "student-sft", args.out / "prefs.jsonl",
                  args.out / "student-dpo", dpo_cfg, progress=False, force=True)  # fmt: skip
    # 4. held-out prompts: judge the greedy answers of both students
    s_sft = judge_model(args.out / "student-sft", eval_p, args.max_new_tokens)
    s_dpo = judge_model(args.out / "student-dpo", eval_p, args.max_new_tokens)
    wins = sum(b > a for a, b in zip(s_sft, s_dpo, strict=True))
    losses = sum(b < a for a, b in zip(s_sft, s_dpo, strict=True))
    result = {
        "sft_ce": {"first": sft.losses[0], "last": sft.losses[-1], "steps": sft.steps},
        "feedback": {
            k: fb[k] for k in ("prompts", "pairs", "ties_dropped", "chosen_wins", "mean_score")
        },
        "dpo": {
            "steps": dpo.steps,
            "heldout_before": dpo.eval_before,
            "heldout_after": dpo.eval_after,
        },
        "eval_prompts": len(eval_p),
        "judge_mean_sft": sum(s_sft) / len(s_sft),
        "judge_mean_dpo": sum(s_dpo) / len(s_dpo),
        "dpo_vs_sft": {"wins": wins, "ties": len(eval_p) - wins - losses, "losses": losses},
        "wall_s": round(time.perf_counter() - t0, 1),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    a = dpo.eval_after
    print("| stage | figure |\n|---|---|")
    print(f"| dSFT | CE {sft.losses[0]:.3f} -> {sft.losses[-1]:.3f} ({sft.steps} steps) |")
    print(f"| feedback | {fb['pairs']} pairs from {fb['prompts']} prompts, "
          f"{fb['ties_dropped']} ties dropped; mean judge score {fb['mean_score']} |")  # fmt: skip
    print(f"| dDPO held-out pairs ({a['pairs']}) | reward accuracy "
          f"{dpo.eval_before['reward_accuracy']:.3f} -> {a['reward_accuracy']:.3f}, margin "
          f"{a['reward_margin']:.4f} |")  # fmt: skip
    print(f"| held-out prompts ({len(eval_p)}) | judge mean dSFT {result['judge_mean_sft']:.3f}"
          f" vs dDPO {result['judge_mean_dpo']:.3f}; dDPO wins/ties/losses {wins}/"
          f"{result['dpo_vs_sft']['ties']}/{losses} |")  # fmt: skip
    print(f"| wall | {result['wall_s']} s |")


if __name__ == "__main__":
    main()
