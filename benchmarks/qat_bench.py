"""QAT and BitNet training vs post-training quantization on a real model (stories260K).

Trains on ``tinystories_train.txt`` and evaluates on ``tinystories_valid.txt`` (disjoint files)
with :func:`weightsmith.evaluate.perplexity` (non-overlapping windows of ``--seq-len``). Rows:
fp32; RTN, GPTQ and QAT at 4, 3 and 2 bits, per output channel (stories260K's MLP width 172
= 4·43 admits no group size of 32); ternary PTQ; BitNet training with and without λ warm-up.
Each run is a forked child process (so peak RSS is per run, imports included) calling the same
library function as the CLI; the equivalent commands are printed with ``--show-commands``.
"Recovered" is the share of the PTQ (RTN / ternary PTQ) perplexity gap to fp32 that training
closes: ``(ppl_ptq − ppl_trained) / (ppl_ptq − ppl_fp32)``.

    OMP_NUM_THREADS=1 python benchmarks/qat_bench.py --workdir /tmp/qatbench --json-out qat.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

# transformers' BitLinear wraps its helpers in torch.compile; compiling them on CPU costs ~30 s
# per evaluation here and does not change the arithmetic, so evaluation runs them eagerly.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

RUNS = ["fp32"]
for _b in (4, 3, 2):
    RUNS += [f"rtn w{_b}", f"gptq w{_b}", f"qat w{_b}"]
RUNS += ["ternary ptq", "bitnet λ-warmup", "bitnet no warmup"]


def _child(fn, args, queue) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as e:  # report any failure to the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def forked(fn, *args) -> dict:
    """Run ``fn(*args)`` in a forked child; returns its dict plus wall time and peak RSS."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    start = time.perf_counter()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise SystemExit(f"{fn.__name__} failed: {value}")
    return {**value, "wall_s": time.perf_counter() - start}


def do_quantize(base: str, out: str, method: str, bits: int, calib: str, samples: int) -> dict:
    from weightsmith.compress import QuantConfig, quantize_checkpoint
    from weightsmith.core.report import peak_rss_bytes

    if method == "ternary":
        cfg = QuantConfig(method="ternary", format="bitnet", group_size=-1)
    else:
        cfg = QuantConfig(method=method, bits=bits, group_size=-1, calib=calib,
                          calib_samples=samples, seq_len=256)  # fmt: skip
    r = quantize_checkpoint(base, out, cfg, force=True, progress=False)
    return {"size": r.extra["output_size"], "rss": peak_rss_bytes()}


def do_train(kind: str, base: str, out: str, data: str, opts: dict) -> dict:
    from weightsmith.compress import QuantConfig
    from weightsmith.compress.qat import (
        BitnetConfig,
        QatConfig,
        TrainConfig,
        bitnet_checkpoint,
        qat_checkpoint,
    )

    train = TrainConfig(steps=opts["steps"], lr=opts["lr"], batch_size=opts["batch_size"],
                        seq_len=opts["seq_len"], kl_weight=opts["kl_weight"])  # fmt: skip
    if kind == "qat":
        quant = QuantConfig(method="rtn", bits=opts["bits"], group_size=-1)
        r = qat_checkpoint(base, out, data, QatConfig(quant=quant, train=train), force=True,
                           progress=False)  # fmt: skip
    else:
        cfg = BitnetConfig(train=train, lambda_warmup=opts["lambda_warmup"],
                           use_rms_norm=opts["use_rms_norm"])  # fmt: skip
        r = bitnet_checkpoint(base, out, data, cfg, force=True, progress=False)
    return {"size": r.output_size, "rss": r.peak_rss, "tokens_per_s": r.tokens_per_s,
            "train_tokens": r.train_tokens, "steps": r.steps, "final_loss": r.final_loss}  # fmt: skip


def do_eval(model: str, data: str, max_tokens: int, seq_len: int) -> dict:
    from weightsmith.evaluate import perplexity

    return perplexity(model, data, seq_len=seq_len, max_tokens=max_tokens, batch_size=4).to_dict()


def command(name: str, base: str, out: str, data: str, calib: str, a, opts: dict) -> str:
    """The CLI command equivalent to one run."""
    ws = f"weightsmith compress {{}} {base} -o {out}"
    if name.startswith(("rtn", "gptq")):
        method, bits = name.split()[0], name.split()[1][1:]
        extra = (
            f" --calib {calib} --calib-samples {a.calib_samples} --seq-len 256"
            if method == "gptq"
            else ""
        )
        return ws.format("quantize") + f" --method {method} --bits {bits} --group-size -1{extra}"
    if name == "ternary ptq":
        return ws.format("quantize") + " --method ternary"
    common = (f" --data {data} --steps {opts['steps']} --lr {opts['lr']} --batch-size "
              f"{opts['batch_size']} --seq-len {opts['seq_len']}")  # fmt: skip
    if opts["kl_weight"] > 0:
        common += f" --distill-from-original --kl-weight {opts['kl_weight']}"
    if name.startswith("qat"):
        return ws.format("qat") + f" --bits {opts['bits']} --group-size -1" + common
    rms = "" if opts["use_rms_norm"] else " --no-rms-norm"
    return ws.format("bitnet") + common + f" --lambda-warmup {opts['lambda_warmup']}{rms}"  # fmt: skip


def qat_lr(spec: str, bits: int) -> float:
    """The lr for ``bits`` from ``"4:1e-4,3:1e-3"`` (or one number for every width)."""
    if ":" not in spec:
        return float(spec)
    table = {int(k): float(v) for k, v in (p.split(":") for p in spec.split(","))}
    return table[bits]


def main() -> None:
    from weightsmith.testing import shared_model, shared_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="stories260K")
    ap.add_argument("--train-data", default="tinystories_train.txt")
    ap.add_argument("--eval-data", default="tinystories_valid.txt")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--qat-steps", type=int, default=80)
    ap.add_argument("--qat-lr", default="4:1e-4,3:1e-3,2:1e-3",
                    help="peak lr per bit width (BITS:LR,...), or one LR for all")  # fmt: skip
    ap.add_argument("--bitnet-steps", type=int, default=80)
    ap.add_argument("--bitnet-lr", type=float, default=3e-3)
    ap.add_argument("--lambda-warmup", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--kl-weight", type=float, default=0.0)
    ap.add_argument("--rms-norm", action="store_true", help="bitnet: --use-rms-norm")
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of: {RUNS}")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--show-commands", action="store_true")
    a = ap.parse_args()

    base, train, valid = (shared_model(a.model), shared_text(a.train_data),
                          shared_text(a.eval_data))  # fmt: skip
    if base is None or train is None or valid is None:
        sys.exit("skipped: the shared model or text is not available")
    base, train, valid = str(base), str(train), str(valid)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="qatbench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    for name in RUNS:
        if a.only and name not in a.only and name != "fp32":
            continue
        out = str(work / name.replace(" ", "_").replace("λ", "lambda"))
        common = {"steps": a.qat_steps, "batch_size": a.batch_size,
                  "seq_len": a.seq_len, "kl_weight": a.kl_weight}  # fmt: skip
        opts: dict = {}
        if name == "fp32":
            model, run = (
                base,
                {"size": sum(p.stat().st_size for p in Path(base).glob("*.safetensors"))},
            )
        elif name.startswith(("rtn", "gptq")):
            method, bits = name.split()[0], int(name.split()[1][1:])
            run = forked(do_quantize, base, out, method, bits, train, a.calib_samples)
            model = out
        elif name == "ternary ptq":
            run, model = forked(do_quantize, base, out, "ternary", 2, train, 0), out
        elif name.startswith("qat"):
            bits = int(name.split()[1][1:])
            opts = {**common, "bits": bits, "lr": qat_lr(a.qat_lr, bits)}
            run, model = forked(do_train, "qat", base, out, train, opts), out
        else:
            opts = {**common, "steps": a.bitnet_steps, "lr": a.bitnet_lr,
                    "lambda_warmup": a.lambda_warmup if "warmup" in name and "no" not in name else 0,
                    "use_rms_norm": a.rms_norm}  # fmt: skip
            run, model = forked(do_train, "bitnet", base, out, train, opts), out
        ev = forked(do_eval, model, valid, a.eval_tokens, a.seq_len)
        rows[name] = {**run, "ppl": ev["ppl"], "eval_tokens": ev["tokens"]}
        if a.show_commands and name != "fp32":
            rows[name]["command"] = command(name, base, out, train, train, a, opts)
        print(f"{name}: ppl {ev['ppl']:.4f} ({time.perf_counter() - started:.0f} s so far)",
              file=sys.stderr)  # fmt: skip
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=2))
    fp = rows["fp32"]["ppl"]

    def recovered(name: str, ref: str) -> str:
        if name not in rows or ref not in rows or rows[ref]["ppl"] <= fp:
            return "-"
        return f"{100 * (rows[ref]['ppl'] - rows[name]['ppl']) / (rows[ref]['ppl'] - fp):.0f}%"

    print("| run | ppl | recovered vs PTQ | size | wall | train tok/s | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ref = f"rtn {name.split()[1]}" if name.startswith(("qat", "gptq")) else (
            "ternary ptq" if name.startswith("bitnet") else None)  # fmt: skip
        rec = recovered(name, ref) if ref else "-"
        wall = f"{r['wall_s']:.0f} s" if "wall_s" in r else "-"
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        rss = f"{r['rss'] / 2**20:.0f} MiB" if "rss" in r else "-"
        print(
            f"| {name} | {r['ppl']:.4f} | {rec} | {r['size'] / 1e3:.1f} kB | {wall} | {tps} | {rss} |"
        )
    if a.show_commands:
        for name, r in rows.items():
            if "command" in r:
                print(f"# {name}: {r['command']}")


if __name__ == "__main__":
    main()
