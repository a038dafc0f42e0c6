"""Hidden-state KD benchmark: a teacher -> a fresh, narrower student (same tokenizer, seeded
random init), equal steps. ``--teacher stories260k`` (5 layers, width 64 -> 3 layers, width
32) or ``--teacher smollm2`` (SmolLM2-135M-Instruct, 30 layers, width 576 -> 4 layers, width
192, pairs 1:8,2:15,3:23,4:30).

Runs (each seed): (a) CE only, (b) CE + hidden-state KD (``--hidden-layers 1:2,2:4,3:5``, a
learned 32 -> 64 projection per pair), (c) logit KD (fkl, α = 0.5, τ = 2), (d) logit KD + hidden
states; then held-out perplexity and KL to the teacher on TinyStories validation text (windows of
256; training text is the disjoint TinyStories train file). Prints the mean over seeds.

    python benchmarks/hidden_bench.py --steps 300 --seeds 0,1 --out /tmp/hidden.json
    python benchmarks/hidden_bench.py --teacher smollm2 --runs a,b --hidden-loss cosine \
        --steps 150 --batch-size 4 --seeds 0,1 --eval-tokens 4096 --out /tmp/hidden-smollm2.json

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

from distill_bench import held_out
from weightsmith.distill import DistillConfig, LossConfig, distill
from weightsmith.distill.hidden import HiddenSettings, parse_layer_pairs
from weightsmith.testing import shared_model, shared_text, smollm2_dir


def fresh_student(
    teacher: Path, out: Path, seed: int, layers: int, width: int, head_dim: int
) -> Path:
    """A randomly initialised Llama with the teacher's tokenizer and vocabulary, narrower:
    ``width // head_dim`` heads with the teacher's query/KV ratio, the teacher's MLP ratio."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(teacher)
    ratio = config.num_attention_heads // config.num_key_value_heads
    config.intermediate_size = round(width * config.intermediate_size / config.hidden_size)
    config.num_hidden_layers, config.hidden_size = layers, width
    heads = width // head_dim
    config.num_attention_heads, config.num_key_value_heads = heads, max(1, heads // ratio)
    config.head_dim = head_dim
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


# teacher -> (how to find it, student layers, width, head_dim, default --layers pairs)
TEACHERS = {
    "stories260k": (lambda: shared_model("stories260K"), 3, 32, 8, "1:2,2:4,3:5"),
    "smollm2": (smollm2_dir, 4, 192, 64, "1:8,2:15,3:23,4:30"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--runs", default="a,b,c,d")
    ap.add_argument("--teacher", choices=sorted(TEACHERS), default="stories260k")
    ap.add_argument("--layers", default=None, help="--hidden-layers (default: per teacher)")
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--hidden-loss", choices=("mse", "cosine"), default="mse")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-chars", type=int, default=300_000)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    find, s_layers, s_width, s_head_dim, pairs = TEACHERS[a.teacher]
    a.layers = a.layers or pairs
    teacher, train_src = find(), shared_text("tinystories_train.txt")
    valid = shared_text("tinystories_valid.txt")
    if teacher is None or train_src is None or valid is None:
        raise SystemExit(f"needs {a.teacher} and ../shared/data/tinystories_{{train,valid}}.txt")
    work = Path(tempfile.mkdtemp(prefix="hidden-bench-"))
    train = work / "train.txt"
    train.write_text(train_src.read_text(encoding="utf-8")[: a.train_chars], encoding="utf-8")
    hidden = HiddenSettings(parse_layer_pairs(a.layers), a.hidden_weight, a.hidden_loss)
    kd = LossConfig(loss="fkl", alpha=0.5, temperature=2.0)
    runs = {
        "a": ("(a) CE only", LossConfig(alpha=1.0), None),
        "b": (f"(b) CE + hidden {a.layers} ({a.hidden_loss}, W={a.hidden_weight})",
              LossConfig(alpha=1.0), hidden),
        "c": ("(c) logit KD (fkl, alpha 0.5, tau 2)", kd, None),
        "d": (f"(d) logit KD + hidden {a.layers}", kd, hidden),
    }  # fmt: skip
    rows: dict[str, list[dict]] = {}
    for seed in [int(x) for x in a.seeds.split(",")]:
        student = fresh_student(
            teacher, work / f"student-{seed}", seed, s_layers, s_width, s_head_dim
        )
        for key in [k.strip() for k in a.runs.split(",")]:
            name, loss, hs = runs[key]
            cfg = DistillConfig(loss=loss, hidden=hs, steps=a.steps, lr=a.lr, seed=seed,
                                batch_size=a.batch_size, seq_len=a.seq_len)  # fmt: skip
            out = work / f"{key}-{seed}"
            res = distill(teacher if (hs or loss.alpha < 1) else None, student, train, out, cfg,
                          progress=False)  # fmt: skip
            row = {"seed": seed, "train_wall_s": res.wall_s, "last_loss": res.losses[-1],
                   **held_out(out, teacher, valid, a.eval_tokens)}  # fmt: skip
            print(name, json.dumps(row), flush=True)
            rows.setdefault(name, []).append(row)
    summary = {
        "settings": vars(a) | {"out": str(a.out) if a.out else None},
        "teacher": held_out(teacher, teacher, valid, a.eval_tokens),
        "mean_over_seeds": {k: {m: statistics.mean(r[m] for r in v) for m in
                                ("ppl", "kl_to_teacher", "train_wall_s")} for k, v in rows.items()},
        "runs": rows,
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
