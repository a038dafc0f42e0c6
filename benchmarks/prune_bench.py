"""Pruning benchmark: dense vs magnitude vs Wanda vs SparseGPT (50%, 2:4, 4:8), layer drop and MLP width.

Every pruning run is a separate ``compress prune`` process (so its wall time and peak RSS are
its own, taken from ``--report``); perplexity uses :func:`weightsmith.evaluate.perplexity`
(non-overlapping windows); generation speed is greedy decoding of ``--gen-tokens`` new tokens
with transformers, batch 1, best of 3.

    python benchmarks/prune_bench.py --model stories260K --out /tmp/prune-bench
    python benchmarks/prune_bench.py --model smollm2 --calib-samples 32 --seq-len 256 \
        --eval-tokens 16384 --only dense,magnitude-50,wanda-50,magnitude-2:4,wanda-2:4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from weightsmith.evaluate import perplexity
from weightsmith.testing import shared_model, shared_text, smollm2_dir


def runs(num_layers: int, nm_ignore: dict[str, list[str]]) -> dict[str, list[str]]:
    """Name -> `compress prune` options."""
    # at least one layer each; on 5 layers both round to 1, so the second becomes 2 (40%)
    drop10 = max(1, round(0.10 * num_layers))
    drop25 = max(drop10 + 1, round(0.25 * num_layers))
    out = {"dense": []}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out[f"{method}-50"] = ["--method", method, "--sparsity", "0.5"]
        for pat in ("2:4", "4:8"):
            ignore = [a for p in nm_ignore.get(pat, []) for a in ("--ignore", p)]
            out[f"{method}-{pat}"] = ["--method", method, "--pattern", pat, *ignore]
    for pat in ("2:4", "4:8"):  # SparseGPT with the paper's N:M rule (--nm-select score)
        out[f"sparsegpt-{pat}-score"] = [*out[f"sparsegpt-{pat}"], "--nm-select", "score"]
    out[f"layers-drop{drop10}"] = ["--method", "layers", "--drop", str(drop10)]
    out[f"layers-drop{drop25}"] = ["--method", "layers", "--drop", str(drop25)]
    out["channels-0.75"] = ["--method", "channels", "--mlp-ratio", "0.75"]
    return out


def speed(path: Path, new_tokens: int) -> tuple[float, float]:
    """(generation tokens/s: greedy, batch 1, best of 3; prefill tokens/s: one forward of
    4 x 256 tokens, best of 5)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[1] + [42] * 7])
    gen = prefill = float("inf")
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            gen = min(gen, time.perf_counter() - t)
        g = torch.Generator().manual_seed(0)
        batch = torch.randint(3, model.config.vocab_size, (4, 256), generator=g)
        for _ in range(5):
            t = time.perf_counter()
            model(batch, use_cache=False)
            prefill = min(prefill, time.perf_counter() - t)
    return new_tokens / gen, batch.numel() / prefill


LLMC_SCRIPT = """
import sys, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

model_dir, ids_file, out, structure = sys.argv[1:5]
ids = torch.load(ids_file)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
recipe = WandaPruningModifier(sparsity=0.5, mask_structure=structure, targets=["Linear"],
                              ignore=["re:.*lm_head"])
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
model.save_pretrained(out, save_compressed=False)
"""


def llmcompressor_parity(args, model: Path, calib: Path, data: Path, out: Path) -> None:
    """Run llm-compressor's WandaPruningModifier (in its own venv) on the same calibration
    tokens and compare masks and perplexity with ours."""
    import shutil

    from weightsmith.compress.prune import PruneConfig, prune_checkpoint
    from weightsmith.core.calibration import load_calibration_text, load_tokenizer, tokenize_windows
    from weightsmith.io import open_checkpoint

    text = load_calibration_text(calib).text
    ids = tokenize_windows(
        load_tokenizer(model), text, samples=args.calib_samples, seq_len=args.seq_len
    )
    torch.save(ids, out / "calib_ids.pt")
    (out / "llmc.py").write_text(LLMC_SCRIPT)
    for structure, pattern in (("0:0", None), ("2:4", (2, 4))):
        tag = "50" if pattern is None else "2:4"
        theirs = out / f"llmc-wanda-{tag}"
        t = time.perf_counter()
        if structure not in args.llmc_structures.split(","):
            continue
        if not (theirs / "config.json").is_file():  # reuse an earlier llm-compressor run
            subprocess.run(
                [
                    args.llmc_python,
                    str(out / "llmc.py"),
                    str(model),
                    str(out / "calib_ids.pt"),
                    str(theirs),
                    structure,
                ],
                check=True,
            )
        their_s = time.perf_counter() - t
        for f in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.model",
        ):
            if (Path(model) / f).is_file():
                shutil.copy(Path(model) / f, theirs / f)
        ours = out / f"ours-wanda-{tag}"
        cfg = PruneConfig(
            method="wanda",
            sparsity=None if pattern else 0.5,
            pattern=pattern,
            calib=str(calib),
            calib_samples=args.calib_samples,
            seq_len=args.seq_len,
        )
        prune_checkpoint(model, ours, cfg, force=True, progress=False)
        a, b = open_checkpoint(ours), open_checkpoint(theirs)
        agree = total = 0
        for n in a.tensors:
            if ".layers." in n and n.endswith("_proj.weight"):
                ma, mb = a.get_tensor(n) == 0, b.get_tensor(n) == 0
                agree += (ma == mb).sum().item()
                total += ma.numel()
        ppl_ours = perplexity(
            ours, data, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens
        ).ppl
        ppl_theirs = perplexity(
            theirs, data, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens
        ).ppl
        print(
            json.dumps(
                {
                    "wanda": tag,
                    "mask_agreement": agree / total,
                    "ppl_weightsmith": ppl_ours,
                    "ppl_llmcompressor": ppl_theirs,
                    "llmcompressor_wall_s": round(their_s, 1),
                }
            ),
            flush=True,
        )


def synthetic_speed(out: Path, rounds: int = 7) -> None:
    """Forward speed of structured-pruned models on a random-weight Llama (hidden 512, MLP
    2048, 8 layers, ~36M params): interleaved rounds, best per model, 1 x 512 tokens."""
    from transformers import AutoModelForCausalLM

    from weightsmith.compress.prune import PruneConfig, prune_checkpoint
    from weightsmith.testing import build_tiny_model

    src = build_tiny_model(out / "synthetic", "llama", hidden_size=512, intermediate_size=2048,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                           max_position_embeddings=1024, max_shard_size="1GB")  # fmt: skip
    cfgs = {
        "drop 2 of 8 layers": PruneConfig(method="layers", layers=(5, 6)),
        "MLP 75%": PruneConfig(method="channels", mlp_ratio=0.75, calib_samples=4, seq_len=64),
    }
    paths = {"dense": src}
    for name, cfg in cfgs.items():
        paths[name] = out / name.replace(" ", "-").replace("%", "")
        prune_checkpoint(src, paths[name], cfg, force=True, progress=False)
    models = {k: AutoModelForCausalLM.from_pretrained(p).eval() for k, p in paths.items()}
    ids = torch.randint(3, 300, (1, 512), generator=torch.Generator().manual_seed(0))
    best = dict.fromkeys(models, float("inf"))
    with torch.no_grad():
        for _ in range(rounds):
            for k, m in models.items():
                t = time.perf_counter()
                m(ids, use_cache=False)
                best[k] = min(best[k], time.perf_counter() - t)
    for k, m in models.items():
        n = sum(p.numel() for p in m.parameters())
        print(
            json.dumps(
                {
                    "model": k,
                    "params": n,
                    "forward_ms": round(1000 * best[k], 1),
                    "tok_s": round(512 / best[k]),
                    "speedup": round(best["dense"] / best[k], 3),
                }
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="stories260K", help="stories260K or smollm2")
    ap.add_argument("--out", default="/tmp/prune-bench")
    ap.add_argument("--calib", default=None, help="default: ../shared/data/tinystories_train.txt")
    ap.add_argument("--eval", dest="eval_text", default=None, help="default: tinystories_valid.txt")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--only", default=None, help="comma-separated run names")
    ap.add_argument(
        "--llmc-python",
        default=None,
        help="python of a venv with llm-compressor: "
        "compare Wanda masks and perplexity with its WandaPruningModifier instead",
    )
    ap.add_argument("--llmc-structures", default="0:0,2:4", help="llm-compressor mask structures")
    ap.add_argument(
        "--synthetic-speed",
        action="store_true",
        help="only measure forward speed of structured pruning on a random 36M Llama",
    )
    args = ap.parse_args()
    if args.synthetic_speed:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        synthetic_speed(Path(args.out))
        return

    model = smollm2_dir() if args.model == "smollm2" else shared_model(args.model)
    if model is None:
        sys.exit(f"model {args.model} not available")
    calib = args.calib or shared_text("tinystories_train.txt")
    data = args.eval_text or shared_text("tinystories_valid.txt")
    config = json.loads((Path(model) / "config.json").read_text())
    width = config["intermediate_size"]
    nm_ignore = {"4:8": ["mlp.down_proj"]} if width % 8 else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = runs(config["num_hidden_layers"], nm_ignore)
    if args.llmc_python:
        llmcompressor_parity(args, Path(model), Path(calib), Path(data), out)
        return
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
    rows = []
    for name, opts in table.items():
        path = Path(model)
        rec: dict = {"run": name, "options": " ".join(opts)}
        if opts:
            path = out / name
            report = out / f"{name}.json"
            cmd = [
                sys.executable, "-m", "weightsmith", "compress", "prune", str(model), "-o", str(path),
                *opts, "--calib", str(calib), "--calib-samples", str(args.calib_samples),
                "--seq-len", str(args.seq_len), "--force", "--no-progress", "--report", str(report),
            ]  # fmt: skip
            if opts[1] == "magnitude" or "--layers" in opts:
                cmd = [c for c in cmd if c not in ("--calib", str(calib))]
            subprocess.run(cmd, check=True)
            body = json.loads(report.read_text())
            extra = body["result"]["extra"]
            rec.update(
                wall_s=body["wall_s"], peak_rss=body["peak_rss"], size=body["result"]["total_size"]
            )
            rec["sparsity"] = extra.get("sparsity")
            rec["dropped"] = extra.get("dropped_layers")
        rec["size"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        ppl = perplexity(path, data, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens)
        rec.update(ppl=ppl.ppl, eval_tokens=ppl.tokens)
        if name == "dense" or opts[1] in ("layers", "channels"):
            rec["gen_tok_s"], rec["prefill_tok_s"] = speed(path, args.gen_tokens)
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| run | options | ppl | size | prune wall s | peak RSS | gen tok/s | prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = f"{r['peak_rss'] / 2**20:.0f} MiB" if "peak_rss" in r else ""
        print(
            f"| {r['run']} | {r['options']} | {r['ppl']:.3f} | {r['size'] / 1024:.0f} KiB | "
            f"{r.get('wall_s', '')} | {rss} | {r.get('gen_tok_s', 0):.0f} | "
            f"{r.get('prefill_tok_s', 0):.0f} |"
        )


if __name__ == "__main__":
    main()
