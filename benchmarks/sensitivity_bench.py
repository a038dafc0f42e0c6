"""Sensitivity-guided mixed precision vs uniform RTN on SmolLM2-135M-Instruct.

Calibrates on the first half of WikiText-2 test (``eval sensitivity``'s measurement: one Linear
at a time, each candidate scheme, KL to fp32), solves the ``--bits-budget`` plan, then measures
on held-out text (the second half of the same file) the KL to fp32, top-1 agreement and
perplexity of (a) uniform RTN w4 g64 and (b) the budgeted plan, with the same size accounting
(bits per weight over the quantized Linears: levels + a 16-bit scale per group). Both models
are the RTN round trip of every Linear (``rtn_quantize`` then dequantize, exactly the values a
``compress quantize --method rtn`` checkpoint decodes to), built in memory.

    python benchmarks/sensitivity_bench.py --samples 2 --seq-len 128 \
        --schemes w3g64,w4g64,w5g64,w8g64 --budget 4.25 --eval-tokens 4096 \
        --out /tmp/sensitivity-bench.json

``--sensitivity FILE`` reuses a report written by a previous run (or by ``eval sensitivity
--report``) instead of measuring again. Needs ../shared (or WEIGHTSMITH_SHARED).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from weightsmith.compress.bits_budget import solve_bits_budget
from weightsmith.compress.schemes import parse_scheme
from weightsmith.compress.sensitivity import (
    ReferenceDistribution,
    budget_units,
    checkpoint_sensitivity,
    parse_scheme_list,
    rtn_round_trip,
)
from weightsmith.core.models import load_causal_lm, load_tokenizer
from weightsmith.testing import shared_text, smollm2_dir


def held_out_windows(tok, text: str, tokens: int, seq_len: int) -> torch.Tensor:
    ids = torch.tensor(tok(text[: tokens * 16])["input_ids"][:tokens], dtype=torch.long)
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def evaluate(model, windows: torch.Tensor, ref: list, assign: dict[str, str]) -> dict:
    """KL to fp32, top-1 agreement and ppl of ``model`` with each Linear in ``assign``
    replaced by its RTN round trip (restored afterwards)."""
    mods = dict(model.named_modules())
    saved = {m: mods[m].weight.data.clone() for m in assign}
    for m, scheme in assign.items():
        mods[m].weight.data.copy_(rtn_round_trip(saved[m], parse_scheme(scheme)))
    kl, agree, nll, n = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for w, r in zip(windows, ref, strict=True):
            logits = model(input_ids=w[None], use_cache=False).logits[0]
            kl += r.mean_kl(logits) * logits.shape[0]
            agree += int((r.p.argmax(-1) == logits.argmax(-1)).sum())
            logp = torch.log_softmax(logits[:-1].float(), -1)
            nll -= float(logp.gather(1, w[1:, None]).sum())
            n += logits.shape[0]
    for m, w in saved.items():
        mods[m].weight.data.copy_(w)
    return {"kl": kl / n, "top1": agree / n, "ppl": math.exp(nll / (n - len(windows)))}


def size_of(report: dict, assign_units: dict[str, str]) -> dict:
    params = sum(u["params"] for u in report["units"])
    bits = sum(
        u["params"] * u["schemes"][assign_units[u["name"]]]["bits_per_weight"]
        for u in report["units"]
    )
    return {"bpw": bits / params, "bytes": bits / 8, "params": params}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--schemes", default="w3g64,w4g64,w5g64,w8g64")
    ap.add_argument("--uniform", default="w4g64")
    ap.add_argument("--budget", type=float, default=4.25)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--sensitivity", default=None, help="reuse this sensitivity report")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model_dir, wiki = smollm2_dir(), shared_text("wikitext2_test.txt")
    if model_dir is None or wiki is None:
        sys.exit("needs SmolLM2-135M-Instruct and ../shared/data/wikitext2_test.txt")
    text = wiki.read_text(encoding="utf-8")
    calib_text, held_out = text[: len(text) // 2], text[len(text) // 2 :]
    start = time.perf_counter()
    if args.sensitivity:
        report = json.loads(Path(args.sensitivity).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            calib = Path(tmp) / "calib.txt"
            calib.write_text(calib_text, encoding="utf-8")
            with tqdm(total=None, desc="sensitivity") as bar:
                result = checkpoint_sensitivity(
                    model_dir, parse_scheme_list(args.schemes), calib=str(calib),
                    samples=args.samples, seq_len=args.seq_len, on_unit=lambda u, k: bar.update(),
                )  # fmt: skip
        report = result.to_dict()
    sens_s = time.perf_counter() - start
    plan = solve_bits_budget(budget_units(report), args.budget)
    uniform = {u["name"]: args.uniform for u in report["units"]}
    model = load_causal_lm(model_dir)
    windows = held_out_windows(load_tokenizer(model_dir), held_out, args.eval_tokens,
                               args.eval_seq_len)  # fmt: skip
    with torch.no_grad():
        ref = [
            ReferenceDistribution.from_logits(model(input_ids=w[None]).logits[0]) for w in windows
        ]
    rows = {}
    for label, assign in (("uniform " + args.uniform, uniform), ("budget plan", plan.choice)):
        t = time.perf_counter()
        rows[label] = {**evaluate(model, windows, ref, assign), **size_of(report, assign),
                       "eval_s": round(time.perf_counter() - t, 1)}  # fmt: skip
        print(label, json.dumps(rows[label]), flush=True)
    counts: dict[str, int] = {}
    for s in plan.choice.values():
        counts[s] = counts.get(s, 0) + 1
    out = {"sensitivity_s": round(sens_s, 1), "plan": plan.to_dict(), "plan_counts": counts,
           "rows": rows, "eval_tokens": int(windows.numel()), "sensitivity": report}  # fmt: skip
    print("plan counts", counts, "sensitivity", round(sens_s, 1), "s")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
