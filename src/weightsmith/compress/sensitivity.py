"""Per-unit quantization sensitivity: KL(original || model with one unit quantized by RTN).

For each unit (one Linear, one decoder layer's Linears, or one module type across layers) and
each candidate scheme, only that unit's weights are replaced by their RTN round trip (the same
``rtn_quantize`` as ``compress quantize --method rtn``), everything else stays float32, and the
mean KL divergence of the next-token distributions to the original model's is measured on the
calibration windows (nats per token, every position).

It is cheap enough for every Linear of a small model: the original log-probabilities and the
hidden states entering every decoder layer are computed once; a unit whose first Linear is in
layer ``i`` is evaluated by running only layers ``i..L-1`` (and the head) from the cached
inputs, with its weights swapped in place and restored afterwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from weightsmith.compress.rtn import RTNConfig, rtn_quantize
from weightsmith.compress.schemes import Scheme, average_bits_per_weight, parse_scheme
from weightsmith.core.device import select_device
from weightsmith.errors import ConfigError

UNIT_KINDS = ("module", "layer", "type")


@dataclass(frozen=True)
class SensitivityUnit:
    """A set of Linears quantized together: ``name`` is the module (``by=module``), the layer
    prefix (``by=layer``) or the path inside a layer, e.g. ``mlp.down_proj`` (``by=type``)."""

    name: str
    modules: tuple[str, ...]
    layer: int  # the first decoder layer the unit touches
    params: int
    shapes: tuple[tuple[int, int], ...] = ()  # (out, in) of each module

    def bits_per_weight(self, scheme: Scheme) -> float:
        """Stored bits per weight of the unit under ``scheme`` (schemes.bits_per_weight)."""
        return average_bits_per_weight((shape, scheme) for shape in self.shapes)


@dataclass
class SensitivityResult:
    """KL per unit and scheme (``kl[unit][scheme]``), with what was measured on."""

    units: list[SensitivityUnit]
    schemes: list[Scheme]
    kl: dict[str, dict[str, float | None]]  # None: the scheme does not fit the unit
    by: str
    tokens: int
    windows: int
    seq_len: int
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        units = []
        for u in self.units:
            per = {
                str(s): {
                    "kl": self.kl[u.name][str(s)],
                    "bits_per_weight": u.bits_per_weight(s),
                    "size_bytes": u.params * u.bits_per_weight(s) / 8,
                }
                for s in self.schemes
                if self.kl[u.name].get(str(s)) is not None
            }
            units.append({"name": u.name, "modules": list(u.modules), "layer": u.layer,
                          "params": u.params, "schemes": per})  # fmt: skip
        return {
            "by": self.by,
            "schemes": [str(s) for s in self.schemes],
            "tokens": self.tokens,
            "windows": self.windows,
            "seq_len": self.seq_len,
            "wall_s": self.wall_s,
            **self.extra,
            "units": units,
        }


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder-layer list and its module name (the ModuleList with
    ``num_hidden_layers`` entries)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return name, mod
    raise ConfigError(f"{type(model).__name__}: cannot find its {n} decoder layers")


def sensitivity_units(model: nn.Module, by: str = "module") -> list[SensitivityUnit]:
    """The units of ``model``'s decoder-layer Linears grouped ``by`` module, layer or type."""
    if by not in UNIT_KINDS:
        raise ConfigError(f"--by must be one of {', '.join(UNIT_KINDS)} (got {by})")
    prefix, layers = decoder_layers(model)
    groups: dict[str, list[tuple[str, int, tuple[int, int]]]] = {}
    for i, layer in enumerate(layers):
        for rel, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            full = f"{prefix}.{i}.{rel}"
            key = {"module": full, "layer": f"{prefix}.{i}", "type": rel}[by]
            groups.setdefault(key, []).append((full, i, tuple(mod.weight.shape)))
    if not groups:
        raise ConfigError(f"{type(model).__name__}: its decoder layers have no nn.Linear")
    return [
        SensitivityUnit(
            name=k, modules=tuple(m for m, _, _ in v), layer=min(i for _, i, _ in v),
            params=sum(o * c for _, _, (o, c) in v), shapes=tuple(sh for *_, sh in v),
        )
        for k, v in groups.items()
    ]  # fmt: skip


def parse_scheme_list(text: str) -> list[Scheme]:
    """Comma-separated candidate schemes (``w3g64,w4g64``; see weightsmith.compress.schemes)."""
    names = [t for t in (p.strip() for p in text.split(",")) if t]
    if not names:
        raise ConfigError("--schemes is empty")
    schemes = [parse_scheme(n) for n in names]
    if len(set(schemes)) != len(schemes):
        raise ConfigError(f"--schemes lists a scheme twice: {text}")
    return schemes


def applicable_schemes(
    model: nn.Module, unit: SensitivityUnit, schemes: Sequence[Scheme]
) -> list[Scheme]:
    """The schemes whose group size divides the input width of every Linear of ``unit``
    (e.g. g128 does not fit SmolLM2's 576 columns); none at all is an error naming the unit."""
    mods = dict(model.named_modules())
    widths = {mods[m].weight.shape[1] for m in unit.modules}
    ok = [s for s in schemes if s.group_size == -1 or all(c % s.group_size == 0 for c in widths)]
    if not ok:
        raise ConfigError(
            f"{unit.name}: no scheme of {', '.join(map(str, schemes))} fits its input "
            f"width{'s' if len(widths) > 1 else ''} {', '.join(map(str, sorted(widths)))} "
            "(the group size must divide it)"
        )
    return ok


def rtn_round_trip(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``w`` quantized with RTN at ``scheme`` and dequantized (scales in ``w``'s dtype)."""
    return rtn_quantize(w, scheme.apply(RTNConfig()), dtype=w.dtype).dequantize().to(w.dtype)


@dataclass(frozen=True)
class ReferenceDistribution:
    """The original next-token probabilities ``p`` ``(tokens, vocab)`` and ``sum p log p``
    per token, kept so each KL costs one log-softmax and one dot product."""

    p: torch.Tensor
    neg_entropy: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> ReferenceDistribution:
        logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
        p = logp.exp()
        return cls(p, torch.einsum("tv,tv->t", p, logp))

    def mean_kl(self, logits: torch.Tensor) -> float:
        """Mean over positions of KL(p || softmax(logits)) in nats (float rounding can make a
        KL of ~0 come out as -1e-9: clamped at 0)."""
        logq = F.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
        kl = float((self.neg_entropy - torch.einsum("tv,tv->t", self.p, logq)).mean())
        return max(kl, 0.0)


class _Passthrough(nn.Module):
    """Stands in for a decoder layer before the one a unit starts in (its output is cached)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if hasattr(layer, "attention_type"):  # read by models with sliding-window layers
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def _start_at(layers: nn.ModuleList, index: int, hidden: torch.Tensor) -> Iterator[None]:
    """Run the model from decoder layer ``index`` on its cached input ``hidden``."""
    saved = [layers[j] for j in range(index)]
    for j in range(index):
        layers[j] = _Passthrough(saved[j])

    def feed(mod, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[index].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for j, layer in enumerate(saved):
            layers[j] = layer


def _reference(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor):
    """The original next-token distribution and every decoder layer's input hidden states."""
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):

        def grab(mod, args, kwargs, i=i):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        handles.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return ReferenceDistribution.from_logits(logits), inputs


def measure_sensitivity(
    model: nn.Module,
    ids: torch.Tensor,
    schemes: Sequence[Scheme],
    *,
    by: str = "module",
    on_unit: Callable[[SensitivityUnit, dict[str, float]], None] | None = None,
) -> SensitivityResult:
    """KL(original || one unit RTN-quantized) for every unit of ``model`` and scheme, on the
    token windows ``ids`` ``(n, seq_len)`` (one batched forward per unit and scheme).
    ``on_unit`` is called after each unit (progress)."""
    start = time.perf_counter()
    units = sensitivity_units(model, by)
    fits = {u.name: applicable_schemes(model, u, schemes) for u in units}
    _, layers = decoder_layers(model)
    mods = dict(model.named_modules())
    kl: dict[str, dict[str, float | None]] = {}
    with torch.no_grad():
        ref, inputs = _reference(model, layers, ids)
        for u in units:
            originals = {m: mods[m].weight.data.clone() for m in u.modules}
            kl[u.name] = {str(s): None for s in schemes}
            with _start_at(layers, u.layer, inputs[u.layer]):
                for s in fits[u.name]:
                    try:
                        for m, w in originals.items():
                            mods[m].weight.data.copy_(rtn_round_trip(w, s))
                        logits = model(input_ids=ids, use_cache=False).logits
                    finally:
                        for m, w in originals.items():
                            mods[m].weight.data.copy_(w)
                    kl[u.name][str(s)] = ref.mean_kl(logits)
            if on_unit is not None:
                on_unit(u, kl[u.name])
    return SensitivityResult(
        units=units, schemes=list(schemes), kl=kl, by=by, tokens=ids.numel(),
        windows=ids.shape[0], seq_len=ids.shape[1],
        wall_s=round(time.perf_counter() - start, 3),
    )  # fmt: skip


def checkpoint_sensitivity(
    path,
    schemes: Sequence[Scheme],
    *,
    calib: str | None = None,
    samples: int = 4,
    seq_len: int = 128,
    by: str = "module",
    on_unit: Callable[[SensitivityUnit, dict[str, float | None]], None] | None = None,
    flags: tuple[str, str] = ("--samples", "--seq-len"),
    device: str = "cpu",
) -> SensitivityResult:
    """:func:`measure_sensitivity` of the checkpoint at ``path`` (loaded in float32 on
    ``device``; ``auto``: CUDA when present) on ``samples`` windows of ``seq_len`` tokens of
    ``calib`` (None: the built-in mix; too little text is an error naming ``flags``)."""
    from weightsmith.core.calibration_data import calibration_windows

    if by not in UNIT_KINDS:
        raise ConfigError(f"--by must be one of {', '.join(UNIT_KINDS)} (got {by})")
    dev = select_device(str(device))  # an unusable device: refused before any work
    ids, info = calibration_windows(path, calib, samples, seq_len, flags)
    model = load_on(path, dev)
    result = measure_sensitivity(model, ids.to(dev), schemes, by=by, on_unit=on_unit)
    result.extra = {"model": str(path), "calib": info["source"], "device": str(dev)}
    return result


def load_on(path, device: torch.device) -> nn.Module:
    """The checkpoint at ``path`` in float32 on ``device``, for a sensitivity pass."""
    from weightsmith.core.models import load_causal_lm

    return load_causal_lm(path).to(device)


def budget_units(report: dict) -> list:
    """The :class:`~weightsmith.compress.bits_budget.BudgetUnit` of each unit of a sensitivity
    report (:meth:`SensitivityResult.to_dict`, or its JSON read back)."""
    from weightsmith.compress.bits_budget import BudgetUnit

    try:
        return [
            BudgetUnit(u["name"], int(u["params"]), {
                name: (float(v["bits_per_weight"]), float(v["kl"]))
                for name, v in u["schemes"].items()
            })
            for u in report["units"]
        ]  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"not a sensitivity report (missing or bad field {e})") from None
