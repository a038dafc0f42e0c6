"""Merge benchmark: weightsmith vs mergekit on a seeded ~1.1B-parameter bf16 Llama.

Generates (once, in a cache folder outside the repository) a base model with TinyLlama-1.1B's
shapes and two "fine-tunes" (base + N(0, 0.002) deltas), then times SLERP (t=0.5), TIES
(density 0.5) and DARE-TIES (density 0.5) with weightsmith and, when its venv exists, with
mergekit, each as a subprocess measured by ``/usr/bin/time -v`` (wall time, peak RSS).

    python benchmarks/merge_bench.py --cache ~/.cache/weightsmith/merge-bench
    python benchmarks/merge_bench.py --cleanup   # delete the generated models afterwards

Not a timed test: run it by hand and record the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from weightsmith.io.writer import CheckpointWriter, TensorSpec

# TinyLlama-1.1B's shapes: 22 layers, hidden 2048, MLP 5632, 32 heads / 4 KV heads, 32000 vocab.
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
MODELS = {"base": None, "ft1": 1, "ft2": 2}  # name -> fine-tune seed (None: the base)
METHODS = (
    "linear", "task_arithmetic", "slerp", "nuslerp", "multislerp", "karcher", "ties",
    "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
    "sce", "model_stock", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough",
    "lora_ref",
)  # fmt: skip
# lora_ref: a linear merge whose first model is ``base+adapter`` (mergekit's model+lora): the
# adapter is folded into base first (mergekit: transformers + peft merge_and_unload, into its
# --lora-merge-cache, emptied before each of its runs; weightsmith: into a temporary folder).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK, LORA_ALPHA = 16, 32


def llama_specs(cfg: dict) -> list[TensorSpec]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    bf = torch.bfloat16
    specs = [TensorSpec("model.embed_tokens.weight", bf, (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", bf, (h,)),
            TensorSpec(p + "self_attn.q_proj.weight", bf, (h, h)),
            TensorSpec(p + "self_attn.k_proj.weight", bf, (kv, h)),
            TensorSpec(p + "self_attn.v_proj.weight", bf, (kv, h)),
            TensorSpec(p + "self_attn.o_proj.weight", bf, (h, h)),
            TensorSpec(p + "post_attention_layernorm.weight", bf, (h,)),
            TensorSpec(p + "mlp.gate_proj.weight", bf, (i, h)),
            TensorSpec(p + "mlp.up_proj.weight", bf, (i, h)),
            TensorSpec(p + "mlp.down_proj.weight", bf, (h, i)),
        ]
    specs += [
        TensorSpec("model.norm.weight", bf, (h,)),
        TensorSpec("lm_head.weight", bf, (v, h)),
    ]
    return specs


def _seed(*parts: object) -> int:
    return (
        int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")
        >> 1
    )


def generate(out: Path, ft_seed: int | None) -> None:
    """Write one model tensor by tensor (never more than one tensor in memory)."""
    if (out / "config.json").is_file():
        return
    specs = llama_specs(CONFIG)
    with CheckpointWriter(out, max_shard_size=2 * 10**9) as writer:
        writer.plan(specs)
        for spec in specs:
            g = torch.Generator().manual_seed(_seed("base", spec.name))
            if spec.name.endswith("norm.weight"):
                w = 1.0 + 0.05 * torch.randn(spec.shape, generator=g)
            else:
                w = 0.02 * torch.randn(spec.shape, generator=g)
            if ft_seed is not None:
                g2 = torch.Generator().manual_seed(_seed("ft", ft_seed, spec.name))
                w += 0.002 * torch.randn(spec.shape, generator=g2)
            writer.write(spec.name, w.to(spec.dtype))
            del w
        writer.write_json("config.json", CONFIG)
        writer.commit({"operation": "merge_bench.generate", "finetune_seed": ft_seed})


def generate_adapter(out: Path, base: Path) -> None:
    """A rank-16 PEFT LoRA adapter on every linear layer of ``base`` (seeded; bf16, as peft
    saves an adapter trained on a bf16 model)."""
    if (out / "adapter_config.json").is_file():
        return
    specs, tensors = {s.name: s for s in llama_specs(CONFIG)}, {}
    for name, spec in specs.items():
        module = name.rsplit(".", 2)[-2]
        if module not in LORA_TARGETS:
            continue
        rows, cols = spec.shape
        key = "base_model.model." + name.removesuffix(".weight")
        g = torch.Generator().manual_seed(_seed("lora", name))
        tensors[key + ".lora_A.weight"] = torch.randn(LORA_RANK, cols, generator=g) / cols**0.5
        tensors[key + ".lora_B.weight"] = 0.01 * torch.randn(rows, LORA_RANK, generator=g)
    out.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file(
        {k: v.to(torch.bfloat16) for k, v in tensors.items()}, out / "adapter_model.safetensors"
    )
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(LORA_TARGETS), "fan_in_fan_out": False, "use_rslora": False,
        "modules_to_save": None, "inference_mode": True,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def _task(models: list[str], **params: float) -> list[dict]:
    return [{"model": m, "parameters": {"weight": 1.0, **params}} for m in models]


def recipes(models: dict[str, Path]) -> dict[str, dict]:
    """Every merge method, as one mergekit YAML each (the same file goes to both tools)."""
    base, ft1, ft2 = (str(models[k]) for k in ("base", "ft1", "ft2"))
    pair = [ft1, ft2]

    def based(method: str, members: list[dict], **params: object) -> dict:
        out = {"merge_method": method, "base_model": base, "models": members}
        return {**out, **({"parameters": params} if params else {}), "dtype": "bfloat16"}

    def free(method: str, members: list[dict], **params: object) -> dict:
        out = {"merge_method": method, "models": members}
        return {**out, **({"parameters": params} if params else {}), "dtype": "bfloat16"}

    plain = [{"model": m} for m in pair]
    return {
        "linear": free("linear", _task(pair)),
        "slerp": {**based("slerp", [{"model": base}, {"model": ft1}], t=0.5)},
        "nuslerp": based("nuslerp", _task(pair)),
        "multislerp": based("multislerp", _task(pair)),
        "karcher": free("karcher", [{"model": base}, *plain]),
        "task_arithmetic": based("task_arithmetic", _task(pair)),
        "ties": based("ties", _task(pair, density=0.5)),
        "dare_ties": based("dare_ties", _task(pair, density=0.5)),
        "dare_linear": based("dare_linear", _task(pair, density=0.5)),
        "breadcrumbs": based("breadcrumbs", _task(pair, density=0.9, gamma=0.01)),
        "breadcrumbs_ties": based("breadcrumbs_ties", _task(pair, density=0.9, gamma=0.01)),
        "della": based("della", _task(pair, density=0.5, epsilon=0.15)),
        "della_linear": based("della_linear", _task(pair, density=0.5, epsilon=0.15)),
        "sce": based("sce", plain, select_topk=0.5),
        "model_stock": based("model_stock", plain),
        "nearswap": based("nearswap", [{"model": ft1}], t=0.001),
        "arcee_fusion": based("arcee_fusion", [{"model": ft1}]),
        "ram": based("ram", plain),
        "ramplus_tl": based("ramplus_tl", plain),
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 16]}]},
                {"sources": [{"model": ft1, "layer_range": [8, 22]}]},
            ],
            "dtype": "bfloat16",
        },
        "lora_ref": free("linear", _task([f"{base}+{models['adapter']}", ft1])),
    }


# Methods whose output depends on a random draw (mergekit's and weightsmith's generators differ):
# compared by distribution in the tests, not bit for bit here.
# arcee_fusion: mergekit takes the quantiles of tensors over 1M entries from an unseeded sample.
RANDOMISED = {"dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion"}


def compare_outputs(ws_out: Path, mk_out: Path) -> dict:
    """Tensor-by-tensor comparison of two safetensors folders, values compared in float32."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        names = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                names.update(dict.fromkeys(f.keys(), shard))
        return names

    a, b = index(ws_out), index(mk_out)
    out = {"tensors": len(a), "missing": sorted(set(a) ^ set(b))[:5], "identical": 0}
    out["max_abs_diff"], out["dtypes"] = 0.0, set()
    for name in sorted(set(a) & set(b)):
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        out["dtypes"].add(f"{x.dtype}/{y.dtype}".replace("torch.", ""))
        if x.shape != y.shape:
            out["max_abs_diff"] = float("inf")
            continue
        if x.dtype != y.dtype:  # mergekit writes some methods' bf16 results as float32
            narrow = x.dtype if x.dtype.itemsize < y.dtype.itemsize else y.dtype
            x, y = x.to(narrow), y.to(narrow)
            out["rounded_to"] = str(narrow).replace("torch.", "")
        x, y = x.float(), y.float()
        if torch.equal(x, y):
            out["identical"] += 1
        else:
            out["max_abs_diff"] = max(out["max_abs_diff"], (x - y).abs().max().item())
    out["dtypes"] = sorted(out["dtypes"])
    return out


def warm(models: list[Path]) -> None:
    """Read every input file once (not timed), so each run starts with the inputs in the page
    cache. Some VMs drop cached file pages while memory is free (seen here: a run after a
    pause met hundreds of page faults waiting on the disk), and one tool would then pay for
    reads that the other did not."""
    buf = bytearray(16 << 20)
    for shard in sorted(p for m in models for p in m.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def timed(cmd: list[str], log: Path, inputs: list[Path]) -> tuple[float, int, int, float]:
    """Run ``cmd`` under /usr/bin/time -v: (wall s, peak RSS bytes, exit code, 1-min load).
    The inputs are read into the page cache and dirty pages flushed first (neither timed), so
    every run starts warm and no run pays for the previous one's write-back."""
    warm(inputs)
    os.sync()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    load = max(load, os.getloadavg()[0])
    return wall, int(m.group(1)) * 1024 if m else -1, proc.returncode, round(load, 1)


def parse_time_log(log: Path) -> dict | None:
    """Wall, CPU (user + sys) seconds, peak RSS and exit status from a /usr/bin/time -v log."""
    if not log.is_file():
        return None
    text = log.read_text(errors="replace")

    def grab(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m.group(1) if m else None

    wall = grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)")
    if wall is None:
        return None
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    return {
        "wall": secs,
        "cpu": float(grab(r"User time \(seconds\): ([\d.]+)") or 0)
        + float(grab(r"System time \(seconds\): ([\d.]+)") or 0),
        "rss": int(grab(r"Maximum resident set size \(kbytes\): (\d+)") or 0) * 1024,
        "ok": grab(r"Exit status: (\d+)") == "0",
    }


def _logs(cache: Path, tool: str, method: str) -> list[dict]:
    runs = [parse_time_log(p) for p in sorted(cache.glob(f"{tool}-{method}.*.log"))]
    return [r for r in runs if r is not None]


def _seconds(x: float) -> str:
    return f"{x:.1f} s" if x < 20 else f"{x:.0f} s"


def identity_cell(cache: Path, method: str) -> str:
    path = cache / f"identity-{method}.json"
    if not path.is_file():
        return "–"
    r = json.loads(path.read_text())
    text = f"{r['identical']}/{r['tensors']} bit-identical"
    if r["identical"] < r["tensors"]:
        text += f", max \\|Δ\\| {r['max_abs_diff']:.2g}"
    if r["missing"]:
        text += f", names differ: {', '.join(r['missing'])}"
    if r.get("rounded_to"):
        text += f" (mergekit's float32 output rounded to {r['rounded_to']})"
    return text + (" (random draw)" if r["randomised"] else "")


def summary_table(cache: Path, methods: list[str]) -> str:
    """The Markdown table, from the logs of the latest runs in ``cache`` (median over the
    repeats, with the range in brackets when there are several)."""
    lines = [
        "| method | runs | weightsmith wall | CPU (user+sys) | peak RSS "
        "| mergekit wall | CPU (user+sys) | peak RSS | wall speed-up (of medians) | CPU ratio "
        "| same tensors as mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cells(runs: list[dict]) -> list[str]:
        if not runs:
            return ["–", "–", "–"]
        flag = "" if all(r["ok"] for r in runs) else " (FAILED)"
        wall = [r["wall"] for r in runs]
        span = f" [{_seconds(min(wall))}–{_seconds(max(wall))}]" if len(runs) > 1 else ""
        return [
            f"{_seconds(statistics.median(wall))}{span}{flag}",
            _seconds(statistics.median(r["cpu"] for r in runs)),
            f"{max(r['rss'] for r in runs) / 2**30:.2f} GiB",
        ]

    for method in methods:
        ws, mk = _logs(cache, "ws", method), _logs(cache, "mk", method)
        ratio = ["–", "–"]
        if ws and mk:
            w = statistics.median(r["wall"] for r in mk) / statistics.median(r["wall"] for r in ws)
            c = statistics.median(r["cpu"] for r in mk) / statistics.median(r["cpu"] for r in ws)
            ratio = [f"{w:.1f}×", f"{c:.1f}×"]
        runs = f"{len(ws)}/{len(mk)}"
        cols = [method, runs, *cells(ws), *cells(mk), *ratio, identity_cell(cache, method)]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cache", default="~/.cache/weightsmith/merge-bench")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--mergekit", default=".cache/peers/mergekit/bin/mergekit-yaml")  # .ci/peers.sh
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool, alternating tools")
    ap.add_argument(
        "--resume", action="store_true", help="keep finished runs' logs; run only what is missing"
    )
    ap.add_argument("--cleanup", action="store_true", help="delete the cache folder and exit")
    ap.add_argument(
        "--table-only", action="store_true", help="print the table from the logs in --cache"
    )
    args = ap.parse_args()
    cache = Path(args.cache).expanduser()
    if args.cleanup:
        shutil.rmtree(cache, ignore_errors=True)
        print(f"removed {cache}")
        return
    if args.table_only:
        print(summary_table(cache, args.methods.split(",")))
        return
    models = {name: cache / name for name in MODELS}
    for name, seed in MODELS.items():
        t0 = time.perf_counter()
        generate(models[name], seed)
        print(f"model {name}: {models[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    models["adapter"] = cache / "adapter"
    generate_adapter(models["adapter"], models["base"])
    compile_package()
    all_recipes = recipes(models)
    run_mergekit = not args.skip_mergekit and Path(args.mergekit).exists()
    methods = args.methods.split(",")
    for method in methods:
        bench_method(cache, method, all_recipes[method], args, run_mergekit)
    print()
    print(summary_table(cache, methods))
    print(f"\nmachine: {os.cpu_count()} CPUs visible, torch {torch.__version__}")


def compile_package() -> None:
    """Byte-compile weightsmith's modules, as an installed package has them: pip compiles a
    package at install (mergekit's has them), while an editable install under
    PYTHONDONTWRITEBYTECODE=1 (this machine's environment) compiles its ~75 modules again in
    every run (~0.1 s)."""
    import compileall

    import weightsmith

    compileall.compile_dir(Path(weightsmith.__file__).parent, quiet=1)


def _ok(log: Path) -> bool:
    run = parse_time_log(log)
    return run is not None and run["ok"]


def bench_method(cache: Path, method: str, recipe: dict, args, run_mergekit: bool) -> None:
    """``--repeat`` alternating runs of both tools; with ``--resume`` runs whose logs say they
    finished are kept. The last repeat keeps both outputs to compare them tensor by tensor."""
    if not args.resume:
        for old in [*cache.glob(f"ws-{method}.*.log"), *cache.glob(f"mk-{method}.*.log")]:
            old.unlink()  # the table reports this run's repeats only
    cfg = cache / f"{method}.yml"
    cfg.write_text(yaml.safe_dump(recipe, sort_keys=False))
    ws_out, mk_out = cache / f"out-ws-{method}", cache / f"out-mk-{method}"
    ws_cmd = [
        sys.executable, "-c", "from weightsmith.cli.main import cli; cli()",
        "merge", "run", str(cfg), "-o", str(ws_out), "--force", "--no-progress",
    ]  # fmt: skip
    mk_cmd = [args.mergekit, str(cfg), str(mk_out), "--no-copy-tokenizer", "--quiet"]
    mk_lora = cache / "mk-lora-cache"  # mergekit needs one for model+lora; emptied per run
    if method == "lora_ref":
        mk_cmd += ["--lora-merge-cache", str(mk_lora)]
    compare = run_mergekit and not (cache / f"identity-{method}.json").is_file()
    for k in range(args.repeat):
        last = k == args.repeat - 1
        jobs = [("ws", ws_cmd, ws_out)] + ([("mk", mk_cmd, mk_out)] if run_mergekit else [])
        for tool, cmd, out in jobs:
            log = cache / f"{tool}-{method}.{k}.log"
            if args.resume and _ok(log) and not (last and compare):
                continue
            # Each tool starts without an output folder (deleting one is not merge work).
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(mk_lora, ignore_errors=True)
            res = timed(cmd, log, [cache / name for name in MODELS])
            print(json.dumps({"method": method, "run": k, tool: res}), flush=True)
            if not (last and compare):
                shutil.rmtree(out, ignore_errors=True)
    if compare and _ok(cache / f"ws-{method}.{args.repeat - 1}.log"):
        result = compare_outputs(ws_out, mk_out)
        result["randomised"] = method in RANDOMISED
        (cache / f"identity-{method}.json").write_text(json.dumps(result))
        print(json.dumps({"method": method, "identity": result}), flush=True)
    shutil.rmtree(ws_out, ignore_errors=True)
    shutil.rmtree(mk_out, ignore_errors=True)
    shutil.rmtree(mk_lora, ignore_errors=True)


if __name__ == "__main__":
    main()
