"""llm-compressor as the peer of ``quantize_bench.py``: one recipe per method, run in its own
venv (``--peer-python``) on the token windows weightsmith calibrates on.

Methods and what they match on the weightsmith side:

- ``gptq`` / ``awq``: ``GPTQModifier`` (static act-order, dampening 0.01, block 128: its
  defaults) / ``AWQModifier`` (duo scaling, 20 grid points) + min-max RTN, int ``bits``,
  symmetric, per channel or ``group``.
- ``w8a8-smoothquant``: ``SmoothQuantModifier`` (strength 0.5) + the ``W8A8`` preset (int8
  per-channel weights, dynamic per-token int8 activations) = ``--method w8a8 --smoothquant``.
- ``fp8-dynamic`` / ``fp8-block`` / ``nvfp4``: the ``FP8_DYNAMIC`` / ``FP8_BLOCK`` /
  ``NVFP4A16`` presets, data-free (no dataset given) = ``--method fp8 [--scheme block]`` /
  ``--method nvfp4``.
- ``sparsegpt-50`` / ``sparsegpt-2:4`` / ``wanda-50``: ``SparseGPTModifier`` /
  ``WandaPruningModifier`` at 50 % (unstructured or 2:4), every Linear but lm_head, saved
  dense = ``compress prune --method sparsegpt|wanda``.
"""

from __future__ import annotations

# recipes that take no --peer-bits (one run each)
FIXED = ("w8a8-smoothquant", "fp8-dynamic", "fp8-block", "nvfp4", "sparsegpt-50", "sparsegpt-2:4", "wanda-50")  # fmt: skip

SCRIPT = """
import json, resource, sys, time
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform import SmoothQuantModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from transformers import AutoModelForCausalLM, AutoTokenizer
base, ids_path, out, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
method = sys.argv[6] if len(sys.argv) > 6 else "gptq"
dtype = sys.argv[7] if len(sys.argv) > 7 else "float32"  # "auto": the checkpoint's own dtype
IntermediatesCache.pin_memory = lambda self, i: None  # AWQ pins its caches: no CPU-only accelerator
ids = torch.load(ids_path)
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto" if dtype == "auto" else torch.float32)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel"}
if group > 0:
    weights.update(strategy="group", group_size=group)
groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
presets = {"fp8-dynamic": "FP8_DYNAMIC", "fp8-block": "FP8_BLOCK", "nvfp4": "NVFP4A16"}
prune = dict(targets=["Linear"], ignore=["re:.*lm_head"], sparsity=0.5)
if method == "awq":  # llm-compressor's defaults: duo scaling, 20 grid points; then min-max RTN
    recipe = [AWQModifier(duo_scaling=True, n_grid=20),
              QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
elif method == "gptq":
    recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01,
                          block_size=128)
elif method == "w8a8-smoothquant":
    recipe = [SmoothQuantModifier(smoothing_strength=0.5),
              QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
elif method in presets:
    recipe = QuantizationModifier(targets="Linear", scheme=presets[method], ignore=["lm_head"])
elif method.startswith("sparsegpt"):
    recipe = SparseGPTModifier(mask_structure="2:4" if method.endswith("2:4") else "0:0", **prune)
elif method == "wanda-50":
    recipe = WandaPruningModifier(mask_structure="0:0", **prune)
else:
    raise SystemExit(f"unknown peer method {method}")
if method in presets:  # data-free: no calibration pass
    oneshot(model=model, recipe=recipe)
else:
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
model.save_pretrained(out, save_compressed=not method.startswith(("sparsegpt", "wanda")))
AutoTokenizer.from_pretrained(base).save_pretrained(out)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]  # not ru_maxrss:
peak = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"wall_s": time.perf_counter() - t, "peak_rss": peak}))  # (kept across exec)
"""
