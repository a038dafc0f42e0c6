"""Distillation benchmark: stories260K teacher -> a student with half its layers dropped.

Trains the same number of steps with (a) CE only, (b) online KD (forward KL), (c) KD from an
offline top-k teacher cache, (d) KD into LoRA and QLoRA students, each run in its own process
(so peak RSS is per run), then measures held-out perplexity and KL to the teacher on
TinyStories validation text (training text is the disjoint TinyStories *train* file).

    python benchmarks/distill_bench.py --steps 60 --out /tmp/distill.json

Needs ../shared (or WEIGHTSMITH_SHARED); exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from weightsmith.core.streaming import stream_transform
from weightsmith.io import TensorSpec, open_checkpoint
from weightsmith.testing import shared_model, shared_text


def drop_layers(teacher: Path, out: Path, keep: list[int]) -> Path:
    """Student = the teacher's layers ``keep`` renumbered 0..n-1 (streamed via the I/O layer)."""
    with open_checkpoint(teacher) as ckpt:
        rename: dict[str, str] = {}
        for name in ckpt.tensors:
            layer = ckpt.arch.layer_of(name)
            if layer is None:
                rename[name] = name
            elif layer in keep:
                rename[name] = ckpt.arch.rename_layer(name, keep.index(layer))
        groups = [g for g in ckpt.groups("tensor") if g.names[0] in rename]

        def plan(g):
            return [TensorSpec(rename[n], ckpt.info(n).torch_dtype, ckpt.info(n).shape)
                    for n in g.names]  # fmt: skip

        def apply(g):
            for n in g.names:
                yield rename[n], ckpt.get_tensor(n)

        stream_transform(
            groups, out, plan=plan, apply=apply, sources=[ckpt], support_from=ckpt.root,
            config_patch={"num_hidden_layers": len(keep)}, force=True, progress=False,
            provenance={"operation": "benchmark-layer-drop", "keep_layers": keep},
        )  # fmt: skip
    return out


def run(args: list[str], report: Path) -> dict:
    cmd = [sys.executable, "-m", "weightsmith.distill", *map(str, args), "--no-progress",
           "--report", str(report)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    body = json.loads(report.read_text())
    body["subprocess_wall_s"] = round(time.perf_counter() - start, 1)
    return body


def held_out(model: Path, teacher: Path, eval_text: Path, max_tokens: int) -> dict:
    from weightsmith.evaluate.perplexity import perplexity

    r = perplexity(model, eval_text, seq_len=256, max_tokens=max_tokens, reference=teacher,
                   batch_size=8)  # fmt: skip
    return {"ppl": r.ppl, "kl_to_teacher": r.kl, "top1_agreement": r.top1_agreement}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="full fine-tuning")
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--train-chars", type=int, default=300_000)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    a = ap.parse_args()

    teacher = shared_model("stories260K")
    train_src, valid_src = (
        shared_text("tinystories_train.txt"),
        shared_text("tinystories_valid.txt"),
    )
    if teacher is None or train_src is None or valid_src is None:
        raise SystemExit("needs ../shared (stories260K, tinystories_{train,valid}.txt)")
    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    train = work / "train.txt"
    train.write_text(train_src.read_text(encoding="utf-8")[: a.train_chars], encoding="utf-8")
    student = drop_layers(teacher, work / "student", keep=[0, 2, 4])

    common = ["--student", student, "--data", train, "--steps", a.steps, "--batch-size",
              a.batch_size, "--seq-len", a.seq_len, "--seed", 0]  # fmt: skip
    kd = ["--loss", "fkl", "--alpha", "0.5", "--temperature", "2.0"]
    lora = ["--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0", "--lr", a.lora_lr]
    results: dict[str, dict] = {}
    start = time.perf_counter()
    cache_dir = work / "cache"
    cache = run(["cache", "--teacher", teacher, "--data", train, "-o", cache_dir, "--top-k", 32,
                 "--temperature", 2.0, "--seq-len", a.seq_len], work / "cache.json")  # fmt: skip
    runs = {
        "(a) CE only": ["--alpha", "1", "--lr", a.lr],
        "(b) KD fkl online": ["--teacher", teacher, *kd, "--lr", a.lr],
        "(c) KD fkl from cache (k=32)": ["--teacher-cache", cache_dir, *kd, "--lr", a.lr],
        "(d) KD fkl, LoRA r16": ["--teacher", teacher, *kd, *lora],
        "(d) KD fkl, QLoRA r16 (NF4)": ["--teacher", teacher, *kd, *lora, "--qlora"],
    }
    for i, (label, extra) in enumerate(runs.items()):
        out = work / f"run{i}"
        body = run([*common, *extra, "-o", out], work / f"run{i}.json")
        res = body["result"]
        results[label] = {
            "train_wall_s": body["wall_s"],
            "tokens_per_s": res["tokens_per_s"],
            "peak_rss_mb": round(body["peak_rss"] / 2**20, 1),
            "first_loss": res["losses"][0],
            "last_loss": res["losses"][-1],
            **held_out(out, teacher, valid_src, a.eval_tokens),
        }
        print(label, json.dumps(results[label]), flush=True)
    baseline = {
        "teacher (stories260K, 5 layers)": held_out(teacher, teacher, valid_src, a.eval_tokens),
        "student before training (layers 0,2,4)": held_out(student, teacher, valid_src,
                                                           a.eval_tokens),
    }  # fmt: skip
    lo, q = results["(d) KD fkl, LoRA r16"], results["(d) KD fkl, QLoRA r16 (NF4)"]
    summary = {
        "settings": vars(a) | {"out": str(a.out) if a.out else None},
        "cache": {k: cache["result"][k] for k in ("bytes", "bytes_per_position", "wall_s")}
        | {"peak_rss_mb": round(cache["peak_rss"] / 2**20, 1)},
        "baseline": baseline,
        "runs": results,
        "qlora_vs_lora": {
            "peak_rss_ratio": round(q["peak_rss_mb"] / lo["peak_rss_mb"], 3),
            "time_ratio": round(q["train_wall_s"] / lo["train_wall_s"], 3),
        },
        "total_wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary, indent=2))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
