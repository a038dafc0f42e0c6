"""GGUF export speed at 1.1B: weightsmith against llama.cpp's own path, side by side.

The model is merge_bench.py's seeded bf16 Llama with TinyLlama-1.1B's shapes (22 layers, hidden
2048, MLP 5632, vocab 32000; generated once into ``--cache``). It has no tokenizer, so a
32000-token SentencePiece-style BPE tokenizer.json is made for it: stories260K's (byte fallback,
``Sequence`` decoder: the kind both weightsmith and ``convert_hf_to_gguf.py`` read as a Llama
vocabulary) extended by deterministic merges of its own tokens. The model folder handed to both
tools links the weights and holds config + tokenizer.

In one run, each command in its own process under ``/usr/bin/time`` (wall time, peak RSS):

- ``weightsmith convert M --format gguf --type T`` for T in F16, Q8_0, Q4_K_M;
- llama.cpp: ``convert_hf_to_gguf.py --outtype f16`` once, then ``llama-quantize`` F16 -> Q8_0
  and F16 -> Q4_K_M (``--threads`` threads); its totals add the conversion to each quantize;
- a sanity check: every tensor of the two Q4_K_M (and Q8_0) files that has the same type in
  both must have identical bytes.

    export WEIGHTSMITH_PEERS_DIR=/work/peers; eval "$(bash .ci/peers.sh)"
    nohup python benchmarks/gguf_big_bench.py --threads 2 \\
        --convert-python /work/peers/llamacpp-convert/bin/python --out /tmp/big.json > big.log &

Not a timed test: run it by hand and record the table in BENCHMARKS.md.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench
from weightsmith.testing import shared_model

VOCAB = 32000
TYPES = ("F16", "Q8_0", "Q4_K_M")


def make_tokenizer(out: Path, vocab_size: int = VOCAB) -> None:
    """stories260K's tokenizer.json grown to ``vocab_size`` tokens by merges of its tokens."""
    src = shared_model("stories260K")
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = tok["model"]["vocab"]
    merges: list = tok["model"]["merges"]
    pieces = [p for p in vocab if not (p.startswith("<") and p.endswith(">"))]
    base = list(pieces)
    k = 0
    while len(vocab) < vocab_size:
        a, b = base[k % len(base)], pieces[(k * 7919) % len(pieces)]
        k += 1
        if a + b in vocab or len(a + b) > 16:
            continue
        vocab[a + b] = len(vocab)
        merges.append([a, b])
        pieces.append(a + b)
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["model_max_length"] = 2048
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def model_dir(cache: Path) -> Path:
    """The bench model: weights hard-linked from merge_bench's base, config + tokenizer here."""
    base = cache / "base"
    merge_bench.generate(base, None)
    out = cache / "gguf-model"
    if not (out / "tokenizer.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():  # hard links: weightsmith refuses symlinks out of the folder
            if f.suffix in (".safetensors", ".json") and f.name != "weightsmith.json":
                (out / f.name).unlink(missing_ok=True)
                os.link(f, out / f.name)
        make_tokenizer(out)
    return out


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall s, peak RSS MB) of one command under /usr/bin/time; output to ``log``."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f, log.open("w") as out:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", f.name, *cmd],
                              stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
        wall, kb = f.read().split()[-2:]
    print(f"  {Path(cmd[0]).name} ... {cmd[-3:]}: {wall} s, {int(kb) / 1024:.0f} MB", flush=True)
    return float(wall), int(kb) / 1024


def same_type_tensors_equal(ours: Path, theirs: Path) -> dict:
    """Tensors present in both files with the same type: how many, and how many byte-equal."""
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    both = [n for n in a if n in b and a[n].tensor_type == b[n].tensor_type]
    equal, same_bytes, total_bytes = [], 0, 0
    for n in both:
        x, y = np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)
        same_bytes += int((x.reshape(-1) == y.reshape(-1)).sum())
        total_bytes += x.size
        if np.array_equal(x, y):
            equal.append(n)
    return {"same_type": len(both), "byte_equal": len(equal), "tensors": len(a),
            "equal_byte_fraction": same_bytes / max(total_bytes, 1),
            "differ": sorted(set(both) - set(equal))[:10]}  # fmt: skip


def run(a: argparse.Namespace, work: Path) -> dict:
    src = model_dir(Path(a.cache).expanduser())
    venv = Path(os.environ["LLAMACPP_VENV"])
    convert_py = next((venv / "sdist").glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    quantize = venv / "build" / "bin" / "llama-quantize"
    cli = "import sys; from weightsmith.cli.main import cli; sys.exit(cli())"
    env_threads = {"WEIGHTSMITH_THREADS": str(a.threads)}
    os.environ.update(env_threads)
    report: dict = {"model": str(src), "threads": a.threads, "load": os.getloadavg()}
    f16 = work / "ref.F16.gguf"
    print("llama.cpp convert_hf_to_gguf.py -> F16", flush=True)
    conv = timed([a.convert_python, str(convert_py), str(src), "--outtype", "f16",
                  "--outfile", str(f16)], work / "convert.log")  # fmt: skip
    rows = {}
    for t in TYPES:
        print(f"{t}:", flush=True)
        ws_out = work / f"ws.{t}.gguf"
        ours = timed([sys.executable, "-c", cli, "convert", str(src), "-o", str(ws_out),
                      "--format", "gguf", "--type", t, "--no-progress", "--force"],
                     work / f"ws.{t}.log")  # fmt: skip
        row = {"weightsmith_s": ours[0], "weightsmith_rss_MB": round(ours[1])}
        if t == "F16":
            row.update(llama_s=conv[0], llama_rss_MB=round(conv[1]), convert_s=conv[0])
            row["check"] = same_type_tensors_equal(ws_out, f16)
        else:
            ref = work / f"ref.{t}.gguf"
            q = timed([str(quantize), str(f16), str(ref), t, str(a.threads)],
                      work / f"quantize.{t}.log")  # fmt: skip
            row.update(llama_s=round(conv[0] + q[0], 2), llama_rss_MB=round(max(conv[1], q[1])),
                       convert_s=conv[0], quantize_s=q[0], quantize_rss_MB=round(q[1]))  # fmt: skip
            row["check"] = same_type_tensors_equal(ws_out, ref)
            ref.unlink()
        ws_out.unlink()
        rows[t] = row
        print(f"  {json.dumps(row)}", flush=True)
    report["rows"] = rows
    return report


def table(report: dict) -> str:
    lines = [
        "| type | weightsmith wall | weightsmith peak RSS | llama.cpp wall (convert + quantize) "
        "| llama.cpp peak RSS | same-type tensors byte-equal |",
        "|---|---|---|---|---|---|",
    ]
    for t, r in report["rows"].items():
        parts = f"{r['convert_s']:.0f} + {r['quantize_s']:.0f}" if "quantize_s" in r else "convert"
        c = r["check"]
        lines.append(
            f"| {t} | {r['weightsmith_s']:.0f} s | {r['weightsmith_rss_MB']} MB "
            f"| {r['llama_s']:.0f} s ({parts}) | {r['llama_rss_MB']} MB "
            f"| {c['byte_equal']}/{c['same_type']} (of {c['tensors']}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="~/.cache/weightsmith/merge-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--convert-python", default=sys.executable)
    ap.add_argument("--work", default=None, help="folder for the GGUF files (default: a tmp dir)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokenizer-only", action="store_true", help="make the model folder, exit")
    a = ap.parse_args()
    if a.tokenizer_only:
        print(model_dir(Path(a.cache).expanduser()))
        return
    if not os.environ.get("LLAMACPP_VENV"):
        raise SystemExit('LLAMACPP_VENV is not set: eval "$(bash .ci/peers.sh)" first')
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gguf-big-", dir=a.work) as tmp:
        report = run(a, Path(tmp))
    report["wall_s"] = round(time.perf_counter() - start, 1)
    print(table(report))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
