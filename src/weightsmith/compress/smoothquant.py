"""SmoothQuant (Xiao et al. 2022) as llm-compressor's ``SmoothQuantModifier`` does it, one
decoder layer at a time on the layer stream: the dynamic range ``r_j = max_t x_tj - min_t x_tj``
of each input channel of a norm's output (the calibration statistic ``channel_range``) and the
largest weight ``m_j = 2 · max_{rows of the balance Linears} |W_ij|`` give the smoothing scale

    s_j = r_j^α / m_j^(1-α)        (r_j where m_j = 0; at least 1e-5)

which is divided out of the norm's weight and multiplied into the balance Linears' columns:
``norm(x)/s · (W·s)ᵀ = norm(x) · Wᵀ``, a no-op before quantization that moves activation
outliers into the weights. Mappings (llm-compressor's defaults for Llama, Mistral, Qwen2):
``input_layernorm`` → q/k/v_proj, ``post_attention_layernorm`` → gate/up_proj.
"""

from __future__ import annotations

from typing import Any

import torch

from weightsmith.core.calibration import CalibrationLayer
from weightsmith.core.transform import require_finite
from weightsmith.errors import ConfigError

MAPPINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}  # weight · x̂
MIN_SCALE = 1e-5


def smoothing_scales(act_range: torch.Tensor, weights: list[torch.Tensor], alpha: float):
    """``s_j`` (see module doc) from the channel ranges and the balance weights ``(out, in)``."""
    wmax = 2.0 * torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
    act_range = act_range.to(wmax.device)  # statistics live on the CPU, weights on the device
    s = act_range.float().pow(alpha) / wmax.pow(1 - alpha)
    s = torch.where(wmax > 0, s, act_range.float())
    return torch.clamp(s, min=MIN_SCALE)


def smoothing_norm(cl: CalibrationLayer, name: str, flag: str = "--smoothquant") -> torch.nn.Module:
    """The norm module ``name`` of the layer that scales are folded into (also AWQ's)."""
    mod = dict(cl.module.named_modules()).get(name)
    if mod is None or type(mod).__name__ not in NORMS:
        kind = type(mod).__name__ if mod is not None else "nothing"
        raise ConfigError(
            f"layer {cl.index}: {flag} folds scales into {name} (an RMSNorm of the "
            f"Llama/Mistral/Qwen2 family); this model has {kind} there"
        )
    return mod


def smooth(cl: CalibrationLayer, alpha: float) -> dict[str, torch.Tensor]:
    """Smooth one layer in place (norm weights and balance Linears, float32); returns the
    scales by norm name. Ranges come from one pass over the calibration batches."""
    for _, balance in MAPPINGS:
        for n in balance:
            if n not in cl.linears:
                raise ConfigError(f"layer {cl.index}: --smoothquant needs {n}; not in this model")
    norms = {norm: smoothing_norm(cl, norm) for norm, _ in MAPPINGS}
    stats = cl.collect([balance[0] for _, balance in MAPPINGS], "channel_range")
    scales = {}
    for norm, balance in MAPPINGS:
        if stats[balance[0]].n == 0:
            raise ConfigError(f"layer {cl.index}: {balance[0]} never ran during calibration")
        ws = [cl.weight(n).float() for n in balance]
        s = smoothing_scales(stats[balance[0]].result(), ws, alpha)
        with torch.no_grad():
            w = norms[norm].weight
            w.copy_((w.float() / s).to(w.dtype))
        for n, w in zip(balance, ws, strict=True):
            cl.set_weight(n, w * s)
        scales[norm] = s
    return scales


def smoothquant_layer(cl: CalibrationLayer, job: Any) -> dict[str, list[tuple[str, Any]]]:
    """The layer step of ``--method w8a8 --smoothquant`` (``job``: the quantize job): smooth,
    then quantize every target Linear from its smoothed weight in the stored dtype; the next
    layers see the quantized weights. Returns checkpoint name -> its stored tensors (the
    rescaled norms and any ``--ignore``d balance Linear too)."""
    for rel, t in cl.module.state_dict().items():
        if cl.prefix + rel in job.ckpt.tensors:
            require_finite(t, str(job.ckpt.path), cl.prefix + rel)
    smooth(cl, job.cfg.options.alpha)
    done: dict[str, list[tuple[str, Any]]] = {}
    for norm, balance in MAPPINGS:
        name = f"{cl.prefix}{norm}.weight"
        done[name] = [
            (name, smoothing_norm(cl, norm).weight.detach().to(job.ckpt.info(name).torch_dtype))
        ]
        for n in balance:
            tensor = cl.tensor_name(n)
            if tensor not in job.by_tensor:  # kept in full precision, but smoothed
                done[tensor] = [(tensor, cl.weight(n).to(job.ckpt.info(tensor).torch_dtype))]
    return round_layer(job, cl, done)


def round_layer(job, cl, done: dict) -> dict:
    """Quantize every target Linear of layer ``cl`` data-free (RTN) in place, adding the
    encoded tensors to ``done`` (also used by AWQ after its scales are folded)."""
    for n in cl.linear_names:
        t = job.by_tensor.get(cl.tensor_name(n))
        if t is None:
            continue
        qw = job.quantize(cl.weight(n).to(t.dtype), target=t)
        cl.set_weight(n, qw.dequantize())
        done[t.tensor] = list(job.encode(t, qw))
    return done
