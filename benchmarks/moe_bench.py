"""MoE memory benchmark: GPTQ on a generated ~2 GB mixture-of-experts checkpoint.

Generates (once, seeded, one tensor at a time, into a cache folder outside the repository) a
float32 Qwen3-MoE checkpoint in transformers' saved layout (one Linear per expert), with the
in-process tiny tokenizer, then runs ``weightsmith compress quantize --method gptq`` on it in
its own process with a short calibration from WikiText-2 and records wall time and peak RSS
against the checkpoint's size. The layer stream holds one decoder layer at a time, so the peak
should stay well below the checkpoint's size.

    python benchmarks/moe_bench.py --out /tmp/moe-bench.json
    python benchmarks/moe_bench.py --layers 2 --experts 8 --out /tmp/moe-small.json  # quick

Needs ../shared (or WEIGHTSMITH_SHARED) for the calibration text; exits with a message when
it is absent. Weights are N(0, 0.02): memory and time are real, quality numbers would not be.
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

import torch
from safetensors.torch import save_file

from weightsmith.testing import shared_text
from weightsmith.testing.tiny import train_tiny_tokenizer

CACHE = Path(
    os.environ.get("WEIGHTSMITH_BENCH_CACHE", Path.home() / ".cache/weightsmith/moe-bench")
)


def moe_config(args: argparse.Namespace):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=320, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=args.hidden // 16,
        num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate, intermediate_size=4 * args.hidden,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0, pad_token_id=1,
    )  # fmt: skip


def layer_shapes(cfg, i: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of decoder layer ``i`` as transformers 5.24 saves a Qwen3-MoE layer."""
    h, hd, e, m = cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.moe_intermediate_size
    p = f"model.layers.{i}."
    out = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, h),
        p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, h),
        p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, h),
        p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * hd),
        p + "self_attn.q_norm.weight": (hd,),
        p + "self_attn.k_norm.weight": (hd,),
        p + "mlp.gate.weight": (e, h),
    }
    for x in range(e):
        out[p + f"mlp.experts.{x}.gate_proj.weight"] = (m, h)
        out[p + f"mlp.experts.{x}.up_proj.weight"] = (m, h)
        out[p + f"mlp.experts.{x}.down_proj.weight"] = (h, m)
    return out


def generate(folder: Path, args: argparse.Namespace) -> Path:
    """The checkpoint, one shard per decoder layer, each tensor drawn from its own seeded
    generator (norm weights are ones): peak memory is one shard."""
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = moe_config(args)
    shards = [{"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}]
    shards += [layer_shapes(cfg, i) for i in range(cfg.num_hidden_layers)]
    shards.append({"model.norm.weight": (cfg.hidden_size,),
                   "lm_head.weight": (cfg.vocab_size, cfg.hidden_size)})  # fmt: skip
    index, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for j, (n, shape) in enumerate(sorted(shard.items())):
            if n.endswith("norm.weight"):
                tensors[n] = torch.ones(shape)
            else:
                gen = torch.Generator().manual_seed(args.seed * 1_000_003 + k * 10_007 + j)
                tensors[n] = torch.randn(shape, generator=gen) * 0.02
            index[n] = name
            total += tensors[n].numel() * 4
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
        print(f"  shard {k + 1}/{len(shards)}", file=sys.stderr, flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    cfg.save_pretrained(folder)
    train_tiny_tokenizer(300).save_pretrained(folder)
    (folder / "done").write_text("ok\n")
    return folder


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-intermediate", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of the quantize process (1 on an oversubscribed machine)",
    )
    ap.add_argument("--min-expert-tokens", type=int, default=None, help="passed to quantize")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args()
    text = shared_text("wikitext2_test.txt")
    if text is None:
        sys.exit("moe_bench: ../shared/data/wikitext2_test.txt not found (set WEIGHTSMITH_SHARED)")
    tag = f"qwen3moe-h{args.hidden}-l{args.layers}-e{args.experts}-k{args.top_k}-m{args.moe_intermediate}-s{args.seed}"
    t = time.perf_counter()
    src = generate(args.cache / tag, args)
    gen_s = time.perf_counter() - t
    size = checkpoint_bytes(src)
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "weightsmith", "compress", "quantize", str(src),
               "-o", str(Path(tmp) / "q"), "--method", "gptq", "--bits", str(args.bits),
               "--group-size", str(args.group_size), "--calib", str(text),
               "--calib-samples", str(args.samples), "--seq-len", str(args.seq_len),
               "--no-progress", "--report", str(report)]  # fmt: skip
        if args.min_expert_tokens is not None:
            cmd += ["--min-expert-tokens", str(args.min_expert_tokens)]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        t = time.perf_counter()
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        subprocess.run(cmd, check=True, env=env)
        wall = time.perf_counter() - t
        child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        body = json.loads(report.read_text())
        out_size = checkpoint_bytes(Path(tmp) / "q")
    extra = body["result"]["extra"]
    tokens = extra.get("expert_tokens", {})
    result = {
        "checkpoint": str(src),
        "checkpoint_bytes": size,
        "params": size // 4,
        "generate_s": round(gen_s, 1),
        "quantize_wall_s": round(wall, 1),
        "report_wall_s": body.get("wall_s"),
        "peak_rss_bytes": body.get("peak_rss"),
        "child_maxrss_bytes": child_rss,
        "peak_over_checkpoint": round(body.get("peak_rss", child_rss) / size, 3),
        "output_bytes": out_size,
        "quantized_linears": extra.get("quantized_linears"),
        "expert_rtn_fallbacks": len(extra.get("expert_rtn_fallbacks", [])),
        "experts_min_max_tokens": [min(tokens.values()), max(tokens.values())] if tokens else None,
        "threads": args.threads,
        "command": " ".join(cmd),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
