"""AWQ (Lin et al. 2023, arXiv:2306.00978) as ``--method awq``: activation-aware scales
searched per decoder layer (:mod:`.awq_search`, llm-compressor's ``AWQModifier`` semantics),
folded into the norms / previous Linears and the balance Linears' columns, then every target
Linear of the layer quantized from its scaled weight by RTN (default) or GPTQ
(``--awq-then gptq``: Hessians of the scaled layer, true-sequential). Because the scales are
folded, the output is an ordinary quantized checkpoint (compressed-tensors ``pack-quantized``
by default) that loads wherever RTN/GPTQ outputs do.

Layer-streamed: one decoder layer in memory; its calibration inputs are recorded once (float
weights), every mapping is searched and folded in order (input_layernorm -> q/k/v,
v_proj -> o_proj when the shapes match, post_attention_layernorm -> gate/up,
up_proj -> down_proj), the layer is quantized, and what feeds the next layer is chosen by
``awq_propagate``: "float" (the default after RTN, as llm-compressor's AWQ + QuantizationModifier
and AutoAWQ do) runs the next layers on the float, smoothed outputs -- every layer is then
calibrated on the float model's own hidden states, and the scale search's target (the float
parent's output) is the output the model is meant to keep; "quantized" (the default after
GPTQ, whose error compensation wants the inputs the quantized model will see) propagates the
quantized layer's outputs. Measured (BENCHMARKS.md): float closes the gap to llm-compressor on SmolLM2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.compress.awq_search import (
    CLIP_AVOID,
    SEARCH_DTYPES,
    capture,
    clip_search,
    fold,
    resolve_mappings,
    search_dtype,
    search_scales,
)
from weightsmith.compress.gptq import DEFAULT_DAMP, gptq_quantize
from weightsmith.compress.registry import CalibratedConfig, GridConfig, quant_method
from weightsmith.compress.rtn import rtn_quantize, rtn_scaled_dequantized
from weightsmith.compress.smoothquant import round_layer
from weightsmith.core.calibration import CalibrationLayer
from weightsmith.core.transform import require_finite
from weightsmith.errors import ConfigError

MIN_TOKENS = 64  # fewer calibration tokens: the per-channel means are noise
DUO_SCALING = ("true", "false", "both")
THEN = ("rtn", "gptq")
PROPAGATE = ("auto", "float", "quantized")  # auto: float after RTN, quantized after GPTQ


@dataclass(frozen=True)
class AWQConfig(GridConfig, CalibratedConfig):
    """``--method awq``: grid options, calibration text, the scale search (``n_grid``
    points; ``duo_scaling`` "true": ``x̄^r / w̄^(1-r)``, "false": ``x̄^r``, "both": half of
    each) and the quantizer run on the scaled weights (``awq_then``; GPTQ's own settings
    apply to "gptq"; ``awq_propagate``: what the next layer is calibrated on, see the module
    doc; ``awq_clip``: AutoAWQ's clipping search after the scales, see :func:`clip_layer`;
    ``awq_search_dtype``: the dtype of the search's forwards, see :mod:`.awq_search`)."""

    n_grid: int = 20
    duo_scaling: str = "true"
    awq_then: str = "rtn"
    awq_propagate: str = "auto"
    awq_clip: bool = True
    awq_search_dtype: str = "auto"
    damp: float = DEFAULT_DAMP
    act_order: bool = False
    block_size: int = 128
    allow_rtn_fallback: bool = False

    @property
    def propagate(self) -> str:
        """``float`` or ``quantized``: ``awq_propagate`` with "auto" resolved."""
        if self.awq_propagate != "auto":
            return self.awq_propagate
        return "quantized" if self.awq_then == "gptq" else "float"

    @property
    def statistic(self) -> str:
        """``hessian`` for GPTQ after the search; else the search's own (mean ``|x|``)."""
        return "hessian" if self.awq_then == "gptq" else "channel_magnitude"

    def validate(self) -> None:
        super().validate()
        if self.duo_scaling not in DUO_SCALING:
            raise ConfigError(f"--duo-scaling must be one of {', '.join(DUO_SCALING)}")
        if self.awq_then not in THEN:
            raise ConfigError(f"--awq-then must be one of {', '.join(THEN)}")
        if self.awq_search_dtype not in SEARCH_DTYPES:
            raise ConfigError(f"--awq-search-dtype must be one of {', '.join(SEARCH_DTYPES)}")
        if self.awq_propagate not in PROPAGATE:
            raise ConfigError(f"--awq-propagate must be one of {', '.join(PROPAGATE)}")
        least = {"true": 3, "false": 2, "both": 4}[self.duo_scaling]
        if self.n_grid < least:
            raise ConfigError(
                f"--n-grid must be at least {least} with --duo-scaling {self.duo_scaling} "
                f"(got {self.n_grid})"
            )
        if not 0 <= self.damp < 1:
            raise ConfigError(f"--damp must be in [0, 1) (got {self.damp})")
        if self.awq_then == "rtn" and (self.damp, self.act_order) != (DEFAULT_DAMP, False):
            raise ConfigError("--damp and --act-order apply to --method awq --awq-then gptq")

    def describe(self) -> dict:
        return {**super().describe(), "awq_then": self.awq_then, "n_grid": self.n_grid,
                "duo_scaling": self.duo_scaling, "awq_propagate": self.propagate,
                "awq_clip": self.awq_clip, "awq_search_dtype": self.awq_search_dtype}  # fmt: skip

    def layer_step(self, cl, job):  # the calibrated layer step (see compress/calibrated.py)
        return awq_layer(cl, job)


@quant_method("awq", config=AWQConfig, statistic="channel_magnitude",
              formats=("compressed-tensors", "gptq"),
              summary="AWQ: activation-aware scales folded in, then RTN or GPTQ "
                      "(--awq-then)")  # fmt: skip
def awq_quantize(
    w: torch.Tensor, cfg: AWQConfig, stat: torch.Tensor | None = None, *,
    dtype: torch.dtype | None = None, zero_min: int | None = None,
) -> Any:  # fmt: skip
    """Quantize an (already scaled) weight: GPTQ with its Hessian ``stat`` under
    ``--awq-then gptq``, else RTN (the scales themselves come from :func:`awq_layer`)."""
    if cfg.awq_then == "gptq":
        return gptq_quantize(w, cfg, stat, dtype=dtype, zero_min=zero_min)
    return rtn_quantize(w, cfg, dtype=dtype, zero_min=zero_min)


def search_and_fold(
    cl: CalibrationLayer, o: AWQConfig, targets: set[str], quant_args: dict,
    grids: dict[str, tuple[AWQConfig, dict]] | None = None,
) -> list[dict]:  # fmt: skip
    """Search and fold the scales of every mapping of layer ``cl`` (in place; ``targets``:
    the Linears quantized, ``quant_args``: RTN's ``dtype``/``zero_min``; ``grids``: a Linear's
    own options and quant args where a scheme map gives it another grid); returns what each
    search chose (``smooth``, ``ratio``, ``duo``, errors, ``scales``)."""
    mappings = resolve_mappings(cl, targets)
    if not mappings:
        return []
    inputs, x_means = capture(cl, mappings)
    grid_of = {n: (grids or {}).get(n, (o, quant_args)) for n in targets}
    device = next(cl.module.parameters()).device
    dtype = search_dtype(o.awq_search_dtype, device)
    quant = {n: _quant_for(*grid_of[n]) for n in targets}
    group_size = {n: grid_of[n][0].group_size for n in targets}
    chosen = []
    for m in mappings:
        s, info = search_scales(
            cl, m, inputs[m.parent], x_means[m.balance[0]].to(device), quant,
            group_size=group_size, n_grid=o.n_grid, duo_scaling=o.duo_scaling, dtype=dtype,
        )  # fmt: skip
        fold(cl, m, s)
        chosen.append({"smooth": m.smooth, **info, "scales": s, "search_dtype": str(dtype)})
    return chosen


@dataclass(frozen=True)
class _RTN:
    """The search's quantizer: RTN on ``opts``'s grid (``args``: ``dtype``/``zero_min``),
    dequantized; ``scaled`` gives a grid point's ``Q(w·s) / s`` in one pass."""

    opts: Any
    args: dict

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return rtn_scaled_dequantized(w, None, self.opts, **self.args)

    def scaled(self, w: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None):
        return rtn_scaled_dequantized(w, s, self.opts, **self.args, out=out)


def _quant_for(opts: AWQConfig, args: dict) -> _RTN:
    return _RTN(opts, args)


def clip_layer(
    cl: CalibrationLayer, o: AWQConfig, targets: set[str], quant_args: dict,
    grids: dict[str, tuple[AWQConfig, dict]] | None = None,
) -> dict[str, float]:  # fmt: skip
    """``awq_clip``: AutoAWQ's clipping search on every target Linear but q/k_proj, after the
    scales are folded: one pass of the layer collects each one's input ``XᵀX`` (of the scaled
    inputs), then each group's range is shrunk where that lowers its output error
    (:func:`~.awq_search.clip_search`) and the clamped weight replaces the scaled one. Returns
    each Linear's mean chosen shrink."""
    names = [n for n in cl.linear_names if n in targets and not n.endswith(CLIP_AVOID)]
    if not names:
        return {}
    stats = cl.collect(names, "hessian")
    shrink = {}
    for n in names:
        opts, args = (grids or {}).get(n, (o, quant_args))
        w, info = clip_search(cl.weight(n), stats.pop(n).result(), _quant_for(opts, args),
                              opts.group_size)  # fmt: skip
        cl.set_weight(n, w)
        shrink[n] = info["shrink"]
    return shrink


def awq_layer(cl: CalibrationLayer, job: Any) -> dict[str, list[tuple[str, Any]]]:
    """The layer step of ``--method awq``: scales searched and folded, then every target
    Linear quantized (RTN here, or GPTQ through the calibrated run); the next layers see the
    float smoothed weights or the quantized ones (``awq_propagate``). Returns checkpoint name
    -> its stored tensors, the rescaled norms, biases and any ``--ignore``d smoothed Linear
    included."""
    tokens = job.calibrated.info["tokens"]
    if tokens < MIN_TOKENS:
        raise ConfigError(
            f"--method awq needs at least {MIN_TOKENS} calibration tokens (got {tokens}); "
            "give a longer --calib text or more --calib-samples/--seq-len"
        )
    for rel, t in cl.module.state_dict().items():
        if cl.prefix + rel in job.ckpt.tensors:
            require_finite(t, str(job.ckpt.path), cl.prefix + rel)
    targets = {n for n in cl.linear_names if cl.tensor_name(n) in job.by_tensor}
    grids = {}
    for n in targets:
        t = job.by_tensor[cl.tensor_name(n)]
        if t.scheme is not None:  # --scheme-map: its own grid
            grids[n] = (job.cfg_for(t).options, job.quant_args_for(t))
    o = job.cfg.options
    chosen = search_and_fold(cl, o, targets, job.quant_args, grids)
    job.stats.setdefault("awq", {})[cl.index] = [
        {k: v for k, v in c.items() if k not in ("scales", "losses")} for c in chosen
    ]
    smoothed = {n: cl.weight(n) for n in targets} if o.propagate == "float" else {}
    if o.awq_clip:
        job.stats.setdefault("awq_clip", {})[cl.index] = clip_layer(
            cl, o, targets, job.quant_args, grids
        )
    if o.awq_then == "gptq":
        done = job.calibrated.quantize_layer(cl)
    else:
        done = round_layer(job, cl, {})  # (its formats rewrite no tensor)
    for n, w in smoothed.items():  # the engine's last pass (next layer's inputs): float
        cl.set_weight(n, w)
    for name, t in cl.state_dict().items():  # norms, biases, kept Linears: as scaled
        if name not in done and name not in job.by_tensor:
            done[name] = [(name, t)]
    return done
