"""Golden outputs: the same command on the same inputs must give the same tensors.

Refactors must not change outputs. Each case is a command line run on
``../shared/models/stories260K`` (and its fine-tune and LoRA adapter); its output's tensors
(names, dtypes, shapes, bytes) are hashed into one sha256, compared with the hash recorded in
``tests/golden/hashes.json`` before the refactor. Metadata (``weightsmith.json``, timings) is
not part of the hash. Training cases run on one thread with a fixed seed.

Regenerate (only when an output is *meant* to change, and say so in the commit)::

    python -m weightsmith.testing.golden --write tests/golden/hashes.json
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

# name -> (data-free?, command line with {base} {ft} {lora} {train} {valid} {prefs} {sbs} {out})
CASES: dict[str, tuple[bool, str]] = {
    "quantize-rtn-ct": (
        True,
        "compress quantize {base} --method rtn --group-size 32 --ignore mlp.down_proj",
    ),
    "quantize-rtn-ct-asym": (
        True,
        "compress quantize {base} --method rtn --bits 3 --group-size -1 --asym",
    ),
    "quantize-rtn-gptq": (
        True,
        "compress quantize {base} --method rtn --format gptq --group-size 32 --ignore mlp.down_proj --ignore mlp.up_proj --ignore mlp.gate_proj",
    ),
    "quantize-nf4": (True, "compress quantize {base} --method nf4"),
    "quantize-nf4-dq": (True, "compress quantize {base} --method nf4 --double-quant"),
    "quantize-ternary": (True, "compress quantize {base} --method ternary"),
    "quantize-ternary-auto": (
        True,
        "compress quantize {base} --method ternary --linear-class autobitlinear --use-rms-norm",
    ),
    "quantize-gptq-ct": (
        False,
        "compress quantize {base} --method gptq --group-size 32 --ignore mlp.down_proj --no-act-order --observer minmax --damp 0.01 --calib {train} --calib-samples 8 --seq-len 64",
    ),
    "quantize-gptq-gptq-actorder": (
        False,
        "compress quantize {base} --method gptq --format gptq --group-size -1 --ignore mlp.down_proj --ignore mlp.up_proj --ignore mlp.gate_proj --act-order --observer minmax --damp 0.01 --calib {train} --calib-samples 8 --seq-len 64",
    ),
    "prune-magnitude": (True, "compress prune {base} --method magnitude --sparsity 0.5"),
    "prune-magnitude-2of4": (True, "compress prune {base} --method magnitude --pattern 2:4"),
    "prune-layers-explicit": (True, "compress prune {base} --method layers --layers 1,3"),
    "prune-wanda": (
        False,
        "compress prune {base} --method wanda --sparsity 0.5 --calib {train} --calib-samples 8 --seq-len 64",
    ),
    "prune-layers-drop": (
        False,
        "compress prune {base} --method layers --drop 1 --calib {train} --calib-samples 8 --seq-len 64",
    ),
    "prune-channels": (
        False,
        "compress prune {base} --method channels --mlp-ratio 0.75 --calib {train} --calib-samples 8 --seq-len 64",
    ),
    "merge-linear": (True, "merge linear {base} {ft} --weights 0.3,0.7"),
    "merge-slerp": (True, "merge slerp {base} {ft} --t 0,0.5,1"),
    "merge-task-arithmetic": (True, "merge task-arithmetic --base {base} {ft} --lambda 0.5"),
    "merge-ties": (True, "merge ties --base {base} {ft} {ft} --density 0.5 --weights 1,0.5"),
    "merge-dare-ties": (True, "merge dare --base {base} {ft} --density 0.5 --ties --seed 0"),
    "merge-dare": (True, "merge dare --base {base} {ft} --density 0.7 --seed 1"),
    "merge-passthrough": (True, "merge passthrough --slice {base}:0:3 --slice {ft}:2:5"),
    "merge-lora": (True, "merge lora {base} {lora} --scale 1.0"),
    "distill-kd": (
        False,
        "distill --teacher {ft} --student {base} --data {train} --steps 3 --batch-size 2 --seq-len 64 --lr 1e-3",
    ),
    "distill-kd-jsd": (
        False,
        "distill --teacher {ft} --student {base} --data {train} --steps 3 --batch-size 2 --seq-len 64 --loss jsd --beta 0.5",
    ),
    "distill-sft": (
        False,
        "distill --method sft --student {base} --data {pairs} --steps 3 --batch-size 2 --seq-len 64 --lr 1e-3",
    ),
    "distill-dpo": (
        False,
        "distill --method dpo --student {base} --data {prefs} --steps 3 --batch-size 2 --seq-len 64 --lr 1e-3",
    ),
    "distill-step-by-step": (
        False,
        "distill --method step-by-step --student {base} --data {sbs} --steps 3 --batch-size 2 --seq-len 64 --lr 1e-3",
    ),
    "qat": (
        False,
        "compress qat {base} --data {train} --steps 3 --batch-size 2 --seq-len 64 --group-size 32 --ignore mlp.down_proj",
    ),
    "bitnet": (
        False,
        "compress bitnet {base} --data {train} --steps 3 --batch-size 2 --seq-len 64 --lambda-warmup 2",
    ),
}


def tensor_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 over every tensor of every ``*.safetensors`` in ``folder``, by sorted name."""
    h = hashlib.sha256()
    items = []
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            items += [(name, shard) for name in f.keys()]  # noqa: SIM118
    for name, shard in sorted(items):
        with safe_open(str(shard), framework="pt") as f:
            t = f.get_tensor(name).contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_inputs(shared: Path, work: Path) -> dict[str, str]:
    """The small data files the cases read (cut from ../shared text, deterministic)."""
    work.mkdir(parents=True, exist_ok=True)
    lines = (shared / "data" / "tinystories_train.txt").read_text(encoding="utf-8").splitlines()
    lines = [ln for ln in lines if ln.strip()][:200]
    (work / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pairs = [{"prompt": ln[:40], "completion": ln[40:120]} for ln in lines[:16]]
    prefs = [
        {"prompt": ln[:40], "chosen": ln[40:100], "rejected": ln[100:160] or "no."}
        for ln in lines[:16]
    ]
    sbs = [
        {"question": ln[:40], "rationale": ln[40:100], "answer": ln.split()[-1]}
        for ln in lines[:16]
    ]
    for name, rows in (("pairs", pairs), ("prefs", prefs), ("sbs", sbs)):
        (work / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
        )
    models = shared / "models"
    return {
        "base": str(models / "stories260K"),
        "ft": str(models / "stories260K-shakespeare"),
        "lora": str(models / "stories260K-lora-shakespeare"),
        "train": str(work / "train.txt"),
        "pairs": str(work / "pairs.jsonl"),
        "prefs": str(work / "prefs.jsonl"),
        "sbs": str(work / "sbs.jsonl"),
    }


def run_case(name: str, paths: dict[str, str], out: Path) -> str:
    """Run one case's command in a one-thread subprocess; the hash of its output tensors."""
    argv = [a.format(**paths) for a in shlex.split(CASES[name][1])] + [
        "-o",
        str(out),
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    code = "import sys, torch; torch.set_num_threads(1); from weightsmith.cli.main import cli; cli(sys.argv[1:], prog_name='weightsmith')"
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return tensor_digest(out)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    from weightsmith.testing.shared import shared_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", help="write the hashes to this JSON file")
    p.add_argument("--check", help="compare with the hashes in this JSON file")
    p.add_argument("cases", nargs="*", help="default: all")
    a = p.parse_args(argv)
    shared = shared_dir()
    if shared is None:
        sys.exit("no ../shared (set WEIGHTSMITH_SHARED)")
    expected = json.loads(Path(a.check).read_text()) if a.check else {}
    got, bad = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_inputs(shared, Path(tmp) / "in")
        for name in a.cases or list(CASES):
            try:
                got[name] = run_case(name, paths, Path(tmp) / name)
            except RuntimeError as e:
                got[name] = f"FAILED {e}"
            status = (
                "" if not expected else ("ok" if expected.get(name) == got[name] else "DIFFERS")
            )
            bad += [name] if status == "DIFFERS" or got[name].startswith("FAILED") else []
            print(f"{name:32s} {got[name][:16]} {status}", flush=True)
    if a.write:
        Path(a.write).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    if bad:
        sys.exit(f"{len(bad)} outputs differ: {', '.join(bad)}")


if __name__ == "__main__":
    main()
