"""AWQ's scale search on one decoder layer (the algorithm; :mod:`.awq` wires it into quantize).

As llm-compressor's ``AWQModifier`` (0.14) does it. A mapping is a *smoothing* module (an
RMSNorm, or a Linear whose output rows feed the next ones) and the *balance* Linears that read
its output; its *parent* is the lowest common ancestor of the balance Linears (``self_attn``
for q/k/v, ``mlp`` for gate/up, the Linear itself for o_proj and down_proj). For each mapping:

* ``x̄_j``: mean ``|x_j|`` of the balance Linears' input channel ``j`` over the calibration
  tokens; ``w̄_j``: the mean over every row of every balance weight of ``|W_ij| / max_group |W|``
  (each quantization group normalised by its own max);
* for each grid point ``(r, duo)``: ``s = x̄^r / (w̄^(1-r) + 1e-4)`` (duo scaling) or ``x̄^r``,
  clamped at 1e-4, then normalised ``s / sqrt(max s · min s)``; the balance weights become
  ``Q(W·s) / s`` (RTN min-max on the grid of the run) and the parent runs on its recorded
  inputs: the loss is the mean squared difference to its float outputs;
* the best ``s`` is folded: balance columns ``W·s``, the smoothing module ``/ s`` (a norm's
  weight, or a Linear's output rows and bias), which leaves the float function unchanged.

The search's forwards (the parent's reference outputs and each grid point's) run in the
*search dtype*: float32, or bfloat16 on a copy of the parent (as llm-compressor runs them on a
bfloat16 checkpoint, and AutoAWQ in float16); the loss is summed in float32 either way. "auto"
takes bfloat16 where matmuls have it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX:
about twice float32's speed) and float32 elsewhere. The ``XᵀX`` loss below stays float32.

The grid (``duo_scaling`` True, the default): ``(0, plain)`` then ``(i/(n-2), duo)`` for
``i < n-1``; False: ``(i/(n-1), plain)``; "both": ``(i/(n/2-1), plain and duo)``.
llm-compressor 0.14 has no clipping search; AutoAWQ's is :func:`clip_search` (``--awq-clip``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from weightsmith.compress.smoothquant import MAPPINGS as NORM_MAPPINGS
from weightsmith.compress.smoothquant import smoothing_norm
from weightsmith.core.calibration import CALIB_DTYPES, CalibrationLayer
from weightsmith.core.device import fast_bfloat16
from weightsmith.errors import ConfigError
from weightsmith.kernels.quant import squared_error

# (smoothing module, balance Linears), in execution order: SmoothQuant's norm -> Linear pairs
# plus the Linear -> Linear ones (llm-compressor's default mappings for Llama, Mistral, Qwen2)
MAPPINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    NORM_MAPPINGS[0],
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    NORM_MAPPINGS[1],
    ("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class Mapping:
    smooth: str
    balance: tuple[str, ...]
    targeted: tuple[str, ...]  # the balance Linears that are quantized
    parent: str


def parent_of(names: tuple[str, ...]) -> str:
    """The lowest common ancestor of module names (a single name: itself)."""
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def resolve_mappings(cl: CalibrationLayer, targets: set[str]) -> list[Mapping]:
    """The mappings of this layer (``targets``: the Linears that are quantized). A norm
    mapping the layer lacks is an error; Linear -> Linear ones whose shapes differ (v_proj ->
    o_proj under grouped-query attention) are skipped, as are mappings with no target."""
    found = []
    for smooth, balance in MAPPINGS:
        missing = [n for n in balance if n not in cl.linears]
        if missing:
            raise ConfigError(
                f"layer {cl.index}: --method awq needs {missing[0]} (Llama/Mistral/Qwen2 "
                "layers); not in this model"
            )
        if smooth in cl.linears:
            if cl.weight_shape(smooth)[0] != cl.weight_shape(balance[0])[1]:
                continue
        else:
            smoothing_norm(cl, smooth, "--method awq")
        targeted = tuple(n for n in balance if n in targets)
        if targeted:
            found.append(Mapping(smooth, balance, targeted, parent_of(balance)))
    return found


Inputs = list[tuple[tuple, dict]]  # (args, kwargs) of each calibration batch


def capture(cl: CalibrationLayer, mappings: list[Mapping]) -> tuple[dict[str, Inputs], dict]:
    """One pass of the layer (current weights): each parent's call arguments per batch, and
    ``x̄`` (mean ``|x|``, float32) of each mapping's first balance Linear's input."""
    parents: dict[str, Inputs] = {m.parent: [] for m in mappings}
    handles = []
    for p in parents:

        def hook(mod: nn.Module, args: tuple, kwargs: dict, p: str = p) -> None:
            parents[p].append((args, dict(kwargs)))

        handles.append(cl.module.get_submodule(p).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        stats = cl.collect(list(dict.fromkeys(m.balance[0] for m in mappings)), "channel_magnitude")
    finally:
        for h in handles:
            h.remove()
    for m in mappings:
        if stats[m.balance[0]].n == 0:
            raise ConfigError(f"layer {cl.index}: {m.balance[0]} never ran during calibration")
    return parents, {n: s.result() for n, s in stats.items()}


def run_parent(module: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    """The parent's output on every recorded batch (the first element of a tuple)."""
    outs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            out = module(*args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def output_mse(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Summed squared error over all batches / number of elements: each difference and square
    in float32 (also of bfloat16 outputs), summed in double: by the native kernel on the CPU
    (one pass), else by torch."""
    loss, n = 0.0, 0
    for a, b in zip(ref, got, strict=True):
        sq = squared_error(a, b)
        if sq is None:  # another device: the same float32 squares, also summed in double
            sq = float((a.float() - b.float()).square().sum(dtype=torch.float64))
        loss += sq
        n += a.numel()
    return loss / n


SEARCH_DTYPES = CALIB_DTYPES  # auto, float32, bfloat16


def search_dtype(name: str, device: torch.device) -> torch.dtype:
    """The search dtype ``name`` on ``device`` ("auto": see the module doc)."""
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if fast_bfloat16(device) else torch.float32


def weight_mean(weights: list[torch.Tensor], group_size: int | Sequence[int]) -> torch.Tensor:
    """``w̄`` (float64): mean over all rows of ``|W| / max|W|`` of its quantization group
    (``group_size``: one for every weight, or each weight's own)."""
    sizes = [group_size] * len(weights) if isinstance(group_size, int) else list(group_size)
    total, rows = 0, 0
    for w, g in zip(weights, sizes, strict=True):
        chunk = w.shape[1] if g == -1 else g
        a = w.reshape(-1, chunk).abs()
        a = (a / (a.amax(1, keepdim=True) + 1e-6)).reshape(w.shape)
        total = total + a.sum(0, dtype=torch.float64)
        rows += w.shape[0]
    return total / rows


def grid(n_grid: int, duo_scaling: str) -> list[tuple[float, bool]]:
    """The ``(ratio, duo)`` grid points, in search order (see module doc)."""
    if duo_scaling == "both":
        n = n_grid // 2
        return [(i / (n - 1), duo) for i in range(n) for duo in (False, True)]
    if duo_scaling == "false":
        return [(i / (n_grid - 1), False) for i in range(n_grid)]
    return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float, duo: bool
) -> torch.Tensor:
    """``s`` of one grid point, normalised by ``sqrt(max·min)``; inf/NaN entries become 1.
    float32 (computed from the float64 ``w̄`` in float64, rounded once), as llm-compressor's
    scales are: the candidates' products and quotients then run in float32."""
    if duo:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[torch.isinf(s)] = 1
    s[torch.isnan(s)] = 1
    return s.float()


QuantFn = Callable[[torch.Tensor], torch.Tensor]  # weight -> its dequantized RTN weight


def scaled_candidate(
    quant: QuantFn, w: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``Q(w·s) / s`` as float32: ``quant.scaled(w, s, out)`` where ``quant`` has it (one fused
    pass, the same bits, possibly written into ``out``: float32, or bfloat16 rounded as
    ``copy_`` rounds), else ``quant`` on the float32 ``w·s``."""
    scaled = getattr(quant, "scaled", None)
    if scaled is not None:
        return scaled(w, s, out)
    return (quant((w * s).float()) / s).float()


def search_scales(
    cl: CalibrationLayer, m: Mapping, inputs: Inputs, x_mean: torch.Tensor,
    quant: QuantFn | dict[str, QuantFn], *, group_size: int | dict[str, int],
    n_grid: int, duo_scaling: str, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """The best ``s`` of mapping ``m`` over the grid; the balance weights are left as they
    were. Returns ``s`` and ``{"ratio", "duo", "initial_error", "best_error", "losses"}``
    (``losses``: every grid point's, in grid order). ``quant`` and ``group_size`` may be per
    balance Linear (mixed precision: each quantized on its own grid); ``dtype``: the search
    dtype (see the module doc)."""
    parent = cl.module.get_submodule(m.parent)
    orig = {n: cl.weight(n) for n in m.balance}
    put, loss_of = _evaluator(cl, m, parent, inputs, orig, dtype)
    quant_of = {n: quant[n] if isinstance(quant, dict) else quant for n in m.targeted}
    sizes = [group_size[n] if isinstance(group_size, dict) else group_size for n in m.targeted]
    w_mean = weight_mean([orig[n] for n in m.targeted], sizes) if duo_scaling != "false" else None
    best, info = None, {"initial_error": None, "best_error": float("inf"), "losses": []}
    try:
        for ratio, duo in grid(n_grid, duo_scaling):
            s = candidate_scales(x_mean, w_mean, ratio, duo)
            for n in m.targeted:
                put(n, quant_of[n], s)
            loss = loss_of()
            info["losses"].append(loss)
            if info["initial_error"] is None:
                info["initial_error"] = loss
            if loss < info["best_error"]:
                best = s.clone()
                info.update(best_error=loss, ratio=ratio, duo=duo)
    finally:
        for n in m.targeted:
            cl.set_weight(n, orig[n])
    if best is None:
        raise ConfigError(
            f"layer {cl.index}: AWQ found no finite loss for {m.smooth} (NaN in {m.parent})"
        )
    return best, info


PutFn = Callable[[str, QuantFn, torch.Tensor], None]  # (balance Linear, quantizer, s)


def _evaluator(
    cl: CalibrationLayer, m: Mapping, parent: nn.Module, inputs: Inputs,
    orig: dict[str, torch.Tensor], dtype: torch.dtype,
) -> tuple[PutFn, Callable[[], float]]:  # fmt: skip
    """How a grid point is tried: ``put`` sets a balance Linear to its candidate ``Q(W·s)/s``,
    ``loss`` measures the current ones. In float32 (and on the ``XᵀX`` path) the layer's own
    Linears take the candidates (the caller restores them); in another ``dtype`` a copy of
    the parent in that dtype runs on the inputs cast to it."""
    loss_of = _loss_fn(cl, m, parent, inputs, orig)
    if loss_of is None and dtype != torch.float32 and not cl.stored_transposed:
        return _shadow_evaluator(m, parent, inputs, orig, dtype)

    def put(n: str, quant: QuantFn, s: torch.Tensor) -> None:
        dest = cl.weight_storage(n)  # written in place by the fused pass
        cand = scaled_candidate(quant, orig[n], s, dest)
        if cand is not dest:
            cl.set_weight(n, cand)

    if loss_of is None:
        ref = run_parent(parent, inputs)
        loss_of = lambda: output_mse(ref, run_parent(parent, inputs))  # noqa: E731
    return put, loss_of


def _shadow_evaluator(
    m: Mapping, parent: nn.Module, inputs: Inputs, orig: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> tuple[PutFn, Callable[[], float]]:  # fmt: skip
    shadow = copy.deepcopy(parent).to(dtype)
    low = [(_cast(args, dtype), _cast(kwargs, dtype)) for args, kwargs in inputs]
    ref = run_parent(parent, inputs)  # the float32 outputs: what the model is meant to keep
    skip = len(m.parent) + 1 if m.parent else 0

    def put(n: str, quant: QuantFn, s: torch.Tensor) -> None:
        target = shadow.get_submodule(n[skip:]) if n != m.parent else shadow
        dest = target.weight.data  # the fused pass may write it in the search dtype
        with torch.no_grad():
            cand = scaled_candidate(quant, orig[n], s, dest if dest.is_contiguous() else None)
            if cand is not dest:
                dest.copy_(cand)

    return put, lambda: output_mse(ref, run_parent(shadow, low))


def _cast(obj, dtype: torch.dtype):
    """``obj`` with every floating tensor in it (tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _loss_fn(
    cl: CalibrationLayer, m: Mapping, parent: nn.Module, inputs: Inputs,
    orig: dict[str, torch.Tensor],
) -> Callable[[], float] | None:  # fmt: skip
    """The ``XᵀX`` search loss of the current balance weights, or None where it does not
    apply (the caller then runs the parent: its output MSE against its float outputs). When
    the parent is the one balance Linear itself (up_proj -> down_proj), its output error is ``X·Dᵀ`` with ``D = W - W'``, so the MSE is ``Σ (D·XᵀX) ∘ D / n``:
    ``XᵀX`` is accumulated once, and each grid point costs one ``(out, in)·(in, in)`` product
    instead of a pass over every calibration token (the same value up to float32 rounding).
    That is cheaper only with more calibration tokens than input features (``out·in²`` vs
    ``tokens·in·out`` per point); with fewer, the Linear is run."""
    gram_path = m.balance == (m.parent,) and m.parent in cl.linears
    if gram_path:
        tokens = sum(_parent_x(a, kw).numel() // _parent_x(a, kw).shape[-1] for a, kw in inputs)
        gram_path = tokens >= cl.weight_shape(m.parent)[1]
    if not gram_path:
        return None
    w0, gram, rows = orig[m.parent].float(), None, 0
    for args, kwargs in inputs:
        x = _parent_x(args, kwargs).detach().float()
        x = x.reshape(-1, x.shape[-1])
        gram = x.t() @ x if gram is None else gram.addmm_(x.t(), x)
        rows += x.shape[0]
    n = rows * w0.shape[0]

    def loss() -> float:
        d = w0 - cl.weight(m.parent).float()
        return float(((d @ gram) * d).sum() / n)

    return loss


def _parent_x(args: tuple, kwargs: dict) -> torch.Tensor:
    """A parent's first input (hidden states: ``args[0]`` or the ``input`` keyword)."""
    return args[0] if args else kwargs["input"]


def fold(cl: CalibrationLayer, m: Mapping, s: torch.Tensor) -> None:
    """Fold ``s`` in: balance columns ``W·s``; the smoothing norm's weight, or the smoothing
    Linear's output rows (the last ``len(s)``) and bias, ``/ s``. The float function stays."""
    for n in m.balance:
        cl.set_weight(n, (cl.weight(n) * s).float())
    with torch.no_grad():
        if m.smooth in cl.linears:
            w = cl.weight(m.smooth)
            k = s.numel()
            w[-k:] = (w[-k:].to(s.dtype) / s.view(-1, 1)).to(w.dtype)
            cl.set_weight(m.smooth, w)
            bias = getattr(cl.linears[m.smooth], "bias", None)
        else:
            mod = smoothing_norm(cl, m.smooth, "--method awq")
            mod.weight.copy_((mod.weight.to(s.dtype) / s).to(mod.weight.dtype))
            bias = getattr(mod, "bias", None)
        if bias is not None:
            bias.copy_((bias.to(s.dtype) / s).to(bias.dtype))


CLIP_AVOID = ("q_proj", "k_proj")  # AutoAWQ clips neither: attention logits are sensitive


def clip_search(
    w: torch.Tensor, gram: torch.Tensor, quant: QuantFn, group_size: int, *,
    n_grid: int = 20, max_shrink: float = 0.5,
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """AutoAWQ's clipping search (``auto_clip``; llm-compressor has none): each quantization
    group's range ``max|W_g|`` is shrunk by ``1 - i/n_grid`` for ``i < max_shrink·n_grid``, the
    weight clamped to ``±`` it and quantized (``quant``), and each group keeps the shrink with
    the least output error ``d_gᵀ G_g d_g`` (``d``: the group's row of ``Q(clamp W) - W``,
    ``G_g``: its diagonal block of the inputs' ``XᵀX``, ``gram``; AutoAWQ sums the same squared
    error over 512 sampled tokens, here over all of them). Returns the clamped weight and
    ``{"shrink": mean chosen shrink, "initial_error", "best_error"}`` (summed over groups)."""
    w = w.float()
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    ng = in_f // g
    idx = torch.arange(ng, device=w.device)
    blocks = gram.float().reshape(ng, g, ng, g)[idx, :, idx, :]  # (ng, g, g)
    wg = w.reshape(out_f, ng, g)
    org_max = wg.abs().amax(-1, keepdim=True)  # (out, ng, 1)
    best_err = torch.full((out_f, ng), float("inf"), device=w.device)
    best_max = org_max.clone()
    initial = None
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        cur = torch.maximum(torch.minimum(wg, max_val), -max_val).reshape(out_f, in_f)
        d = (quant(cur).float() - w).reshape(out_f, ng, g)
        err = torch.einsum("ogj,gjk,ogk->og", d, blocks, d)
        if initial is None:
            initial = float(err.sum())
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
    clipped = torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(out_f, in_f)
    shrink = float((1 - best_max / org_max.clamp(min=1e-30)).mean())
    return clipped, {
        "shrink": shrink,
        "initial_error": initial,
        "best_error": float(best_err.sum()),
    }
