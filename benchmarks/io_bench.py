"""Benchmark the streaming I/O layer: convert a generated ~1 GB checkpoint.

Prints wall time, peak RSS and throughput for
  - a plain file copy of the same shards (the floor),
  - ``weightsmith convert`` re-sharding (bit-exact raw-byte path),
  - ``weightsmith convert --dtype float16`` (decode, cast, encode one tensor at a time),
  - transformers ``from_pretrained`` + ``save_pretrained`` (what people do by hand),
each in its own process so peak RSS is that job's alone.

    python benchmarks/io_bench.py [--size-gb 1.0] [--workdir /tmp/ws-io-bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (HIDDEN // 8, HIDDEN),
        p + "self_attn.v_proj.weight": (HIDDEN // 8, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
    }


def generate(path: Path, size_gb: float) -> None:
    """A Llama-shaped bf16 checkpoint of about ``size_gb`` GB, written by weightsmith's writer."""
    import torch

    from weightsmith.io import CheckpointWriter, TensorSpec

    per_layer = sum(numel(s) for s in layer_shapes(0).values()) * 2
    fixed = 2 * VOCAB * HIDDEN * 2
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update(layer_shapes(i))
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    gen = torch.Generator().manual_seed(0)
    with CheckpointWriter(path, max_shard_size=500 * 10**6) as w:
        w.plan([TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()])
        for name, shape in shapes.items():
            w.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
        w.write_json(
            "config.json",
            {
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
                "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": VOCAB,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False, "dtype": "bfloat16",
            },
        )  # fmt: skip
        w.commit({"operation": "io_bench generate"})


def timed(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``; return wall seconds and the child's peak RSS in bytes."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024


def warm(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ws-io-bench"))
    ap.add_argument("--keep", action="store_true", help="keep generated files")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--generate-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        generate(args.generate_only, args.size_gb)
        return
    # This process never imports torch: a forked child inherits its parent's peak RSS on
    # Linux, so a heavy parent would inflate every job's figure.

    src = args.workdir / "src"
    if not (src / "config.json").exists():
        shutil.rmtree(args.workdir, ignore_errors=True)
        args.workdir.mkdir(parents=True)
        print(f"generating a {args.size_gb} GB bf16 checkpoint in {src} ...", flush=True)
        subprocess.run(
            [sys.executable, __file__, "--generate-only", str(src), "--size-gb", str(args.size_gb)],
            check=True,
        )
    nbytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    ws = [sys.executable, "-m", "weightsmith"]
    hf = (
        "import sys, torch; from transformers import AutoModelForCausalLM as M; "
        "m = M.from_pretrained(sys.argv[1], dtype=torch.float16); "
        "m.save_pretrained(sys.argv[2], max_shard_size='2GB')"
    )
    jobs = {
        "plain copy (cp -r)": ["cp", "-r", str(src), "{out}"],
        "weightsmith convert (reshard, bit-exact)": [
            *ws, "convert", str(src), "-o", "{out}", "--max-shard-size", "2GB", "--no-progress",
            "--report", "{report}",
        ],
        "weightsmith convert --dtype float16": [
            *ws, "convert", str(src), "-o", "{out}", "--dtype", "float16", "--no-progress",
            "--report", "{report}",
        ],
        "transformers from_pretrained+save_pretrained (fp16)": [
            sys.executable, "-c", hf, str(src), "{out}",
        ],
    }  # fmt: skip
    rows = []
    for label, cmd in jobs.items():
        out = args.workdir / "out"
        shutil.rmtree(out, ignore_errors=True)
        warm(src)
        report = args.workdir / "report.json"
        report.unlink(missing_ok=True)
        wall, rss = timed([c.replace("{out}", str(out)).replace("{report}", str(report))
                           for c in cmd])  # fmt: skip
        # weightsmith's own report separates the transform from interpreter/torch start-up
        work = json.loads(report.read_text())["result"]["wall_s"] if report.exists() else None
        rows.append({"job": label, "wall_s": round(wall, 2), "transform_s": work,
                     "peak_rss_mb": round(rss / 1e6),
                     "throughput_gb_s": round(nbytes / 1e9 / (work or wall), 2)})  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)

    print(f"\ncheckpoint: {nbytes / 1e9:.2f} GB bf16 in {len(list(src.glob('*.safetensors')))} "
          f"shards; torch {version('torch')}; {os.cpu_count()} cores")  # fmt: skip
    print(f"{'job':<55} {'wall s':>7} {'transform s':>12} {'peak RSS MB':>12} {'GB/s':>6}")
    for r in rows:
        work = "-" if r["transform_s"] is None else f"{r['transform_s']:.2f}"
        print(f"{r['job']:<55} {r['wall_s']:>7} {work:>12} {r['peak_rss_mb']:>12} "
              f"{r['throughput_gb_s']:>6}")  # fmt: skip
    print(
        "wall s: the whole process (incl. Python/torch start-up); transform s: weightsmith's "
        "own timing of the conversion; GB/s uses transform s where known."
    )
    if args.json:
        args.json.write_text(json.dumps({"size_bytes": nbytes, "rows": rows}, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
