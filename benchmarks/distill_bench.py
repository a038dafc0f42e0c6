"""Distillation benchmark: a real teacher -> a student with every other layer dropped.

Trains the same number of steps with (a) CE only, (b) online KD (forward KL), (c) KD from an
offline top-k teacher cache, (d) KD into LoRA and QLoRA students, each run in its own process
(so peak RSS is per run), then measures held-out perplexity and KL to the teacher on
TinyStories validation text (training text is the disjoint TinyStories *train* file).
``--teacher`` picks stories260K (5 layers, default) or SmolLM2-135M-Instruct (30 layers;
big enough for the teacher's weights and logits to show in peak RSS).

    python benchmarks/distill_bench.py --steps 60 --out /tmp/distill.json
    python benchmarks/distill_bench.py --teacher smollm2 --runs b,c,lora,qlora --lora-teacher cache \
        --steps 5 --batch-size 4 --lr 3e-4 --lora-lr 1e-3 --train-chars 12000 \
        --eval-tokens 2048 --eval-batch-size 4 --out /tmp/distill-smollm2.json

``--fsdp`` instead times FSDP2 (``distill kd --fsdp``, online teacher sharded too): the same
steps in 1 process and in 2 processes (``torchrun --nproc_per_node 2``, gloo on CPU), with the
wall time and each process's peak RSS and parameter / AdamW-state elements held:

    python benchmarks/distill_bench.py --teacher smollm2 --fsdp --steps 4 --batch-size 4 \
        --seq-len 128 --train-chars 12000 --out /tmp/distill-fsdp.json

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
from weightsmith.testing import shared_model, shared_text, smollm2_dir

TEACHERS = {  # name -> (how to find it, label)
    "stories260k": (lambda: shared_model("stories260K"), "stories260K"),
    "smollm2": (smollm2_dir, "SmolLM2-135M-Instruct"),
}
RUNS = ("a", "b", "c", "lora", "qlora")


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


def num_layers(model: Path) -> int:
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    return int(config["num_hidden_layers"])


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


def run_fsdp(args: list[str], report: Path, processes: int) -> dict:
    """One ``distill kd --fsdp`` run in ``processes`` processes (torchrun; gloo on CPU)."""
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    if processes == 1:
        head = [sys.executable]
    cmd = [*head, "-m", "weightsmith.distill", "kd", *map(str, args), "--fsdp", "--no-progress",
           "--report", str(report)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    wall = time.perf_counter() - start
    res = json.loads(report.read_text())["result"]
    mb = 2**20
    return {
        "processes": processes,
        "wall_s": round(wall, 1),  # launcher start to exit: loading, training, gather + save
        "train_tokens_per_s": res["tokens_per_s"],
        "first_loss": res["losses"][0],
        "last_loss": res["losses"][-1],
        "per_process": [
            {
                "rank": r["rank"],
                "peak_rss_mb": round(r["peak_rss"] / mb, 1),
                "param_elements": r["param_elements"],
                "optimizer_elements": r["optimizer_elements"],
            }
            for r in res["fsdp"]["ranks"]
        ],
    }


def fsdp_bench(a, teacher: Path, student: Path, train: Path, work: Path) -> dict:
    """1 vs 2 processes of FSDP2 KD (teacher online, sharded too), same steps and data."""
    args = ["--teacher", teacher, "--student", student, "--data", train, "--steps", a.steps,
            "--batch-size", a.batch_size, "--seq-len", a.seq_len, "--lr", a.lr, "--seed", 0]  # fmt: skip
    out: dict = {"settings": vars(a) | {"out": str(a.out) if a.out else None}}
    for n in (1, 2):
        out[f"{n}_process"] = run_fsdp([*args, "-o", work / f"fsdp-{n}"], work / f"f{n}.json", n)
        print(n, json.dumps(out[f"{n}_process"]), flush=True)
    with open_checkpoint(work / "fsdp-1") as x, open_checkpoint(work / "fsdp-2") as y:
        out["max_abs_weight_diff_1_vs_2"] = max(
            float((x.get_tensor(n).float() - y.get_tensor(n).float()).abs().max())
            for n in x.tensors
        )
    return out


def held_out(model: Path, teacher: Path, eval_text: Path, max_tokens: int, batch: int = 8) -> dict:
    from weightsmith.evaluate.perplexity import perplexity

    r = perplexity(model, eval_text, seq_len=256, max_tokens=max_tokens, reference=teacher,
                   batch_size=batch)  # fmt: skip
    return {"ppl": r.ppl, "kl_to_teacher": r.kl, "top1_agreement": r.top1_agreement}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", choices=sorted(TEACHERS), default="stories260k")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {','.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="full fine-tuning")
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--lora-teacher", choices=("online", "cache"), default="online",
                    help="where the LoRA/QLoRA runs get the teacher signal")  # fmt: skip
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--train-chars", type=int, default=300_000)
    ap.add_argument("--eval-tokens", type=int, default=16_384, help="0 = no held-out eval")
    ap.add_argument("--eval-batch-size", type=int, default=8, help="windows of 256 tokens")
    ap.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    ap.add_argument("--fsdp", action="store_true",
                    help="time FSDP2 KD in 1 vs 2 processes instead of the --runs")  # fmt: skip
    a = ap.parse_args()
    wanted = [r.strip() for r in a.runs.split(",") if r.strip()]
    if unknown := sorted(set(wanted) - set(RUNS)):
        raise SystemExit(f"--runs: unknown {unknown} (choose from {','.join(RUNS)})")

    find, label = TEACHERS[a.teacher]
    teacher = find()
    train_src, valid_src = (
        shared_text("tinystories_train.txt"),
        shared_text("tinystories_valid.txt"),
    )
    if teacher is None or train_src is None or valid_src is None:
        raise SystemExit(f"needs {label} and ../shared/data/tinystories_{{train,valid}}.txt")
    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    train = work / "train.txt"
    train.write_text(train_src.read_text(encoding="utf-8")[: a.train_chars], encoding="utf-8")
    n_layers = num_layers(teacher)
    keep = list(range(0, n_layers, 2))  # layers 0, 2, 4, …: half of them dropped
    student = drop_layers(teacher, work / "student", keep=keep)
    if a.fsdp:
        summary = fsdp_bench(a, teacher, student, train, work)
        print(json.dumps(summary, indent=2))
        if a.out:
            a.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return

    def evaluate(model: Path) -> dict:
        return held_out(model, teacher, valid_src, a.eval_tokens, a.eval_batch_size)

    common = ["--student", student, "--data", train, "--steps", a.steps, "--batch-size",
              a.batch_size, "--seq-len", a.seq_len, "--seed", 0]  # fmt: skip
    kd = ["--loss", "fkl", "--alpha", "0.5", "--temperature", "2.0"]
    lora = ["--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0", "--lr", a.lora_lr]
    results: dict[str, dict] = {}
    by_key: dict[str, dict] = {}
    start = time.perf_counter()
    cache_dir = work / "cache"
    cache = None
    if "c" in wanted or (a.lora_teacher == "cache" and {"lora", "qlora"} & set(wanted)):
        cache = run(["cache", "--teacher", teacher, "--data", train, "-o", cache_dir, "--top-k",
                     a.top_k, "--temperature", 2.0, "--seq-len", a.seq_len],
                    work / "cache.json")  # fmt: skip
        print("cache", json.dumps({k: cache["result"][k] for k in ("bytes", "wall_s")}), flush=True)
    online, cached = ["--teacher", teacher], ["--teacher-cache", cache_dir]
    lora_src, src_note = (cached, "cache") if a.lora_teacher == "cache" else (online, "online")
    runs = {
        "a": ("(a) CE only", ["--alpha", "1", "--lr", a.lr]),
        "b": ("(b) KD fkl online", [*online, *kd, "--lr", a.lr]),
        "c": (f"(c) KD fkl from cache (k={a.top_k})", [*cached, *kd, "--lr", a.lr]),
        "lora": (f"(d) KD fkl ({src_note}), LoRA r16", [*lora_src, *kd, *lora]),
        "qlora": (f"(d) KD fkl ({src_note}), QLoRA r16 (NF4)", [*lora_src, *kd, *lora, "--qlora"]),
    }
    for key in [r for r in RUNS if r in wanted]:
        name, extra = runs[key]
        out = work / f"run-{key}"
        body = run([*common, *extra, "-o", out], work / f"run-{key}.json")
        res = body["result"]
        results[name] = {
            "train_wall_s": body["wall_s"],
            "tokens_per_s": res["tokens_per_s"],
            "peak_rss_mb": round(body["peak_rss"] / 2**20, 1),
            "train_peak_rss_mb": round(res.get("train_peak_rss", 0) / 2**20, 1),
            "first_loss": res["losses"][0],
            "last_loss": res["losses"][-1],
            **(evaluate(out) if a.eval_tokens else {}),
        }
        by_key[key] = results[name]
        print(name, json.dumps(results[name]), flush=True)
    baseline = {}
    if a.eval_tokens:
        baseline = {
            f"teacher ({label}, {n_layers} layers)": evaluate(teacher),
            f"student before training (layers {','.join(map(str, keep))})": evaluate(student),
        }
    summary = {
        "settings": vars(a) | {"out": str(a.out) if a.out else None, "keep_layers": keep},
        "baseline": baseline,
        "runs": results,
        "total_wall_s": round(time.perf_counter() - start, 1),
    }
    if cache is not None:
        summary["cache"] = {
            k: cache["result"][k] for k in ("bytes", "bytes_per_position", "positions", "wall_s")
        } | {
            "examples": cache["result"]["examples"],
            "peak_rss_mb": round(cache["peak_rss"] / 2**20, 1),
        }
    if "lora" in by_key and "qlora" in by_key:
        lo, q = by_key["lora"], by_key["qlora"]
        summary["qlora_vs_lora"] = {
            "peak_rss_ratio": round(q["peak_rss_mb"] / lo["peak_rss_mb"], 3),
            "train_peak_rss_ratio": round(q["train_peak_rss_mb"] / lo["train_peak_rss_mb"], 3),
            "time_ratio": round(q["train_wall_s"] / lo["train_wall_s"], 3),
            "tokens_per_s_ratio": round(q["tokens_per_s"] / lo["tokens_per_s"], 3),
        }
    print(json.dumps(summary, indent=2))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
