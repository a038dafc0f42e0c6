"""NF4 through bitsandbytes' ``quantize_4bit`` (blocksize 64, optional double quant), saved
exactly as transformers saves a ``BitsAndBytesConfig(load_in_4bit=True)`` model: the packed
``uint8`` weight ``(numel/2, 1)`` under ``<module>.weight`` plus the quant-state tensors
``<module>.weight.absmax``, ``.quant_map``, (``.nested_absmax``, ``.nested_quant_map``) and
``.quant_state.bitsandbytes__nf4`` (its JSON). No NF4 code of our own.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace

import torch
from tqdm.auto import tqdm

from weightsmith.compress.registry import QuantConfig, QuantizedWeight, output_format, quant_method
from weightsmith.core.calibration import build_skeleton
from weightsmith.core.report import peak_rss_bytes
from weightsmith.core.streaming import StreamResult
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import open_checkpoint
from weightsmith.io.writer import CheckpointWriter, TensorSpec

BLOCKSIZE = 64


def nf4_quantize_tensor(w: torch.Tensor, *, double_quant: bool = False) -> dict[str, torch.Tensor]:
    """bitsandbytes NF4 of one weight: ``{"weight": packed uint8, "weight.absmax": ..., ...}``."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        w.contiguous(), blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=double_quant,
        quant_storage=torch.uint8,
    )  # fmt: skip
    out = {"weight": packed}
    out.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out


def nf4_dequantize(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`nf4_quantize_tensor` (bitsandbytes' own dequantization)."""
    import bitsandbytes.functional as bnbf

    qs = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
    state = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
    return bnbf.dequantize_4bit(tensors["weight"], state)


@quant_method("nf4", summary="NF4 4-bit (bitsandbytes quantize_4bit, blocksize 64)")
def _nf4_method(w: torch.Tensor, cfg: QuantConfig, hessian=None, *, dtype=None) -> QuantizedWeight:
    raise ConfigError("nf4 writes bitsandbytes tensors directly; use quantize_checkpoint")


@output_format
class BnbFormat:
    """bitsandbytes 4-bit (NF4), as transformers saves ``BitsAndBytesConfig(load_in_4bit=True)``."""

    name = "bnb"
    summary = "bitsandbytes NF4, reloads with transformers + bitsandbytes (CPU or GPU)"

    def check(self, cfg: QuantConfig) -> None:
        return None


def quantize_nf4_checkpoint(
    path: str | os.PathLike[str], out: str | os.PathLike[str], cfg: QuantConfig, *, force: bool = False,
    progress: bool = True,
):  # fmt: skip
    """NF4-quantize every Linear (but lm_head and ``cfg.ignore``) of ``path`` into ``out``.

    The quant-state JSON's length is only known after quantizing, so tensors are written
    through the writer's unplanned (spill) path, still one tensor at a time."""
    from weightsmith.compress.quantize import QuantizeResult, select_linears

    start = time.perf_counter()
    cfg = replace(cfg, group_size=-1)  # NF4 blocks run over the flattened weight
    with open_checkpoint(path) as ckpt:
        if ckpt.config is None:
            raise CheckpointError(f"{ckpt.root}: no config.json; quantization needs it")
        targets, ignored = select_linears(ckpt, build_skeleton(ckpt), cfg)
        by_tensor = {t.tensor: t for t in targets}
        dtype = ckpt.info(targets[0].tensor).torch_dtype
        qcfg = {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": cfg.double_quant,
            "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": ignored,
            "llm_int8_threshold": 6.0,
        }
        with CheckpointWriter(out, force=force, inputs=[ckpt.path]) as writer:
            for n in tqdm(
                list(ckpt.tensors), disable=not progress, desc="quantize nf4", leave=False
            ):
                t = by_tensor.get(n)
                if t is None:
                    writer.write_raw(
                        TensorSpec(n, ckpt.info(n).torch_dtype, ckpt.info(n).shape),
                        ckpt.raw_chunks(n),
                    )
                    continue
                for k, v in nf4_quantize_tensor(
                    ckpt.get_tensor(n), double_quant=cfg.double_quant
                ).items():
                    writer.write(f"{t.module}.{k}", v)

            def patch(config: dict) -> dict:
                config["quantization_config"] = qcfg
                return config

            writer.copy_support_files(ckpt.root, config_patch=patch)
            summary = writer.commit(
                {
                    "operation": "quantize",
                    "config": asdict(cfg),
                    "inputs": [{"path": str(ckpt.path), "fingerprint": ckpt.fingerprint()}],
                }
            )
        quantized = sum(t.shape[0] * t.shape[1] for t in targets)
        r = QuantizeResult(**StreamResult(
            out=summary.out, shards=summary.shards, tensors=summary.tensors,
            total_size=summary.total_size, wall_s=round(time.perf_counter() - start, 3),
            peak_rss=peak_rss_bytes(),
        ).__dict__)  # fmt: skip
        r.extra = {
            "method": "nf4", "format": "bnb", "bits": 4, "group_size": BLOCKSIZE,
            "symmetric": True, "input_size": ckpt.total_bytes, "output_size": summary.total_size,
            "quantized_linears": len(targets), "kept_linears": ignored, "params": ckpt.num_params,
            "quantized_params": quantized, "fraction_quantized": quantized / ckpt.num_params,
            "calibration": None, "rtn_fallbacks": [], "gptq_loss": None,
        }  # fmt: skip
        return r
