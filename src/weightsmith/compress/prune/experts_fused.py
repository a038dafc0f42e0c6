"""Unstructured and N:M pruning (magnitude, Wanda) of fused 3-D experts (gpt-oss).

Every expert's slice of a fused tensor is pruned as its own Linear, weight ``(out, in)`` (the
slice transposed for gpt-oss's ``(experts, in, out)`` storage), so the sparsity (per row,
per N:M block) holds per expert. Wanda's input norms of expert ``e`` come from the tokens the
model's own router sends it: a forward pre-hook on the fused experts module reads the router's
top-k indices and computes, for those tokens only, the expert's gate/up input (the hidden
state) and its down input (gpt-oss's gated activation, ``_apply_gate`` of the model's own
module). The experts run after the layer's attention has been pruned (the attention Linears'
masks are computed first, on the unpruned layer), and the pruned layer feeds the next one.
An expert routed fewer than ``--min-expert-tokens`` tokens gets magnitude scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from weightsmith.compress.moe import ExpertRouting
from weightsmith.compress.prune.masks import check_sparsity
from weightsmith.compress.prune.wanda import ColumnNormStat
from weightsmith.core.calibration import CalibrationLayer
from weightsmith.core.experts_fused import FusedExpertTensor, expert_weight, fused_experts
from weightsmith.core.transform import require_finite
from weightsmith.errors import ConfigError, OutputError
from weightsmith.io.reader import Checkpoint

__all__ = [
    "FusedInputNorms",
    "FusedPruning",
    "fused_report",
    "fused_wanda_masks",
    "prune_fused_tensor",
]

MaskFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _attr(cl: CalibrationLayer, f: FusedExpertTensor) -> tuple[nn.Module, str]:
    owner, _, attr = f.tensor[len(cl.prefix) :].rpartition(".")
    return cl.module.get_submodule(owner), attr


class FusedInputNorms:
    """Wanda's ``sum_t x_tj^2`` for every expert slice of one fused experts module: ``first``
    (gate/up) sees the routed hidden states, ``second`` (down) their gated activation, as the
    module computes it (gpt-oss: its ``_apply_gate`` of interleaved gate/up plus bias;
    Mixtral/Qwen3-MoE: ``act_fn(gate) * up`` of the concatenated halves)."""

    def __init__(self, module: nn.Module, first: str, second: str, layout: str, all_tokens: bool):
        if not (hasattr(module, "_apply_gate") or hasattr(module, "act_fn")):
            raise ConfigError(f"{type(module).__name__}: unknown fused experts module; use "
                              "--method magnitude")  # fmt: skip
        self.first, self.second, self.layout, self.all_tokens = first, second, layout, all_tokens
        w1, w2 = getattr(module, first), getattr(module, second)
        n = w1.shape[0]
        self.stats = {(first, e): ColumnNormStat(expert_weight(w1, 0, layout).shape[1])
                      for e in range(n)}  # fmt: skip
        self.stats.update({(second, e): ColumnNormStat(expert_weight(w2, 0, layout).shape[1])
                           for e in range(n)})  # fmt: skip
        self.handle = module.register_forward_pre_hook(self._hook)

    def _activation(self, mod: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
        w, b = getattr(mod, self.first), getattr(mod, self.first + "_bias", None)
        h = x @ expert_weight(w, e, self.layout).t() + (b[e] if b is not None else 0)
        if hasattr(mod, "_apply_gate"):
            return mod._apply_gate(h)
        gate, up = h.chunk(2, dim=-1)
        return mod.act_fn(gate) * up

    def _hook(self, mod: nn.Module, args: tuple) -> None:
        x, index = args[0].reshape(-1, args[0].shape[-1]), args[1]
        for e in range(getattr(mod, self.first).shape[0]):
            routed = torch.ones_like(index[:, 0], dtype=torch.bool) if self.all_tokens else (
                (index == e).any(-1))  # fmt: skip
            if not routed.any():
                continue
            xe = x[routed]
            self.stats[self.first, e].add(xe.float())
            self.stats[self.second, e].add(self._activation(mod, xe, e).float())


def fused_wanda_masks(
    cl: CalibrationLayer, fused: list[FusedExpertTensor], cfg, mask_fn: MaskFn, moe_stats: dict
) -> dict[str, list[torch.Tensor]]:
    """Wanda masks (``(out, in)``, one per expert) of a layer's fused expert tensors, by tensor
    name; the layer's fused parameters are masked in place (later layers see them pruned)."""
    if not fused:
        return {}
    module, first = _attr(cl, fused[0])
    second = _attr(cl, fused[-1])[1]
    routing = ExpertRouting(cl, cfg.min_expert_tokens, cfg.calibrate_all_experts)
    norms = FusedInputNorms(module, first, second, fused[0].layout, cfg.calibrate_all_experts)
    try:
        cl.collect([], lambda n, m: None)  # the whole layer, every batch: the hooks record
    finally:
        norms.handle.remove()
    rel = fused[0].tensor[len(cl.prefix) :].rpartition(".")[0]
    count = getattr(module, first).shape[0]
    names = [f"{rel}.{e}.{attr}" for attr in (first, second) for e in range(count)]
    starved = routing.starved(names)
    out: dict[str, list[torch.Tensor]] = {}
    for f in fused:
        param = getattr(module, _attr(cl, f)[1])
        masks = []
        for e in range(param.shape[0]):
            name = f"{rel}.{e}.{_attr(cl, f)[1]}"
            view = expert_weight(param.data, e, f.layout)
            norm = None if name in starved else norms.stats[_attr(cl, f)[1], e].norm()
            mask = mask_fn(view.float(), torch.ones(view.shape[1]) if norm is None else norm)
            view.masked_fill_(mask, 0)
            masks.append(mask)
        out[f.tensor] = masks
    routing.record_into(moe_stats, [cl.prefix + n for n in sorted(starved)])
    return out


def prune_fused_tensor(
    stored: torch.Tensor, f: FusedExpertTensor, cfg, compare: str, masks: list[torch.Tensor]
) -> tuple[int, torch.Tensor]:
    """(zeros, ``stored`` with expert ``e``'s slice zeroed where ``masks[e]`` (``(out, in)``)
    says), the requested sparsity verified on every expert slice; the rest bit-identical."""
    pruned = stored.clone()
    zeros = 0
    for e, mask in enumerate(masks):
        view = expert_weight(pruned, e, f.layout)
        view[mask] = 0
        try:
            zeros += check_sparsity(view, sparsity=cfg.target_sparsity, pattern=cfg.pattern,
                                    compare=compare)  # fmt: skip
        except ValueError as err:  # cannot happen unless a mask function is wrong
            raise OutputError(f"{f.tensor}[{e}]: requested sparsity not reached ({err})") from None
    return zeros, pruned


def fused_report(
    extra: dict,
    shapes: dict[str, tuple[int, ...]],
    zeros: dict[str, int],
    linears: tuple[int, int],
    num_params: int,
) -> None:
    """Add the fused experts (``shapes``/``zeros`` by tensor name) to an unstructured-prune
    ``--report``; ``linears``: (zeros, elements) of the pruned Linears. ``sparsity`` and
    ``sparsity_of_all_params`` then count the expert slices too."""
    if not zeros:
        return
    numel = {n: math.prod(shapes[n]) for n in zeros}
    pruned, total = linears[0] + sum(zeros.values()), linears[1] + sum(numel.values())
    extra["sparsity"] = pruned / total
    extra["sparsity_of_all_params"] = pruned / num_params
    extra["pruned_expert_slices"] = sum(shapes[n][0] for n in zeros)
    extra["pruned_linears"] += extra["pruned_expert_slices"]  # each slice is one Linear
    extra["expert_sparsity"] = {n: zeros[n] / numel[n] for n in zeros}


class FusedPruning:
    """The fused experts of one unstructured-prune run: ``mask_fn(w, norm)`` is the run's mask
    of one ``(out, in)`` weight (``norm`` None: data-free)."""

    def __init__(self, ckpt: Checkpoint, cfg, compare: str, mask_fn: MaskFn) -> None:
        self.ckpt, self.cfg, self.compare, self.mask_fn = ckpt, cfg, compare, mask_fn
        self.fused = {f.tensor: f for f in fused_experts(ckpt)}
        self.zeros: dict[str, int] = {}
        for f in self.fused.values():
            shape = ckpt.info(f.tensor).shape
            n_in = shape[1] if f.layout == "in_out" else shape[2]
            if cfg.pattern is not None and n_in % cfg.pattern[1]:
                raise ConfigError(f"{f.tensor}: experts' {n_in} input features are not "
                                  f"divisible by M={cfg.pattern[1]} of --pattern")  # fmt: skip

    def __contains__(self, name: str) -> bool:
        return name in self.fused

    def read(self, name: str) -> torch.Tensor:
        return require_finite(self.ckpt.get_tensor(name), str(self.ckpt.path), name)

    def data_free(self, name: str) -> torch.Tensor:
        """Tensor ``name`` pruned per expert slice from its weights alone (magnitude)."""
        stored, f = self.read(name), self.fused[name]
        views = [expert_weight(stored, e, f.layout) for e in range(stored.shape[0])]
        return self.finish(name, [self.mask_fn(w.float(), None) for w in views])

    def layer_masks(self, cl: CalibrationLayer, moe_stats: dict) -> dict[str, list]:
        here = [f for f in self.fused.values() if f.layer == cl.index]
        return fused_wanda_masks(cl, here, self.cfg, self.mask_fn, moe_stats)

    def finish(self, name: str, masks: list[torch.Tensor]) -> torch.Tensor:
        self.zeros[name], pruned = prune_fused_tensor(
            self.read(name), self.fused[name], self.cfg, self.compare, masks
        )
        return pruned

    def report(self, extra: dict, linears: tuple[int, int]) -> None:
        shapes = {n: self.ckpt.info(n).shape for n in self.fused}
        fused_report(extra, shapes, self.zeros, linears, self.ckpt.num_params)
