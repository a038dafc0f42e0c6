"""Layer-streamed calibration: run a checkpoint on disk one decoder layer at a time.

This is the engine under every calibration-based method (GPTQ, Wanda, ...). Peak memory is
one decoder layer plus the calibration activations (plus the embeddings while the first
layer's inputs are computed), independent of depth.

How it works:

1. The model skeleton is built from ``config.json`` with parameters on the ``meta`` device
   (buffers such as rotary ``inv_freq`` are real), so nothing of size is allocated.
2. The embeddings (every non-layer tensor except the lm_head) are read from the checkpoint and
   the model's own ``forward`` runs on the calibration tokens until it reaches decoder layer 0,
   where a catcher records the hidden states and every argument transformers passes to a layer
   (rotary ``position_embeddings``, the causal mask, ``position_ids``...). The layer call
   therefore matches transformers exactly for every architecture it supports, with no
   per-architecture code. The embeddings are then released.
3. For each layer in order, :meth:`LayerStreamer.run_layer` reads only that layer's tensors,
   materialises the transformers decoder-layer module, hands a :class:`CalibrationLayer` to a
   callback (which may collect statistics of its Linears' inputs and modify weights), then
   runs the *modified* layer on the stored hidden states to produce the next layer's inputs,
   and releases the layer again.

Example (a callback that records each Linear's mean squared input per column, as Wanda needs)::

    with open_checkpoint(path) as ckpt:
        ids = calibration_tokens(ckpt, text, samples=128, seq_len=512)
        streamer = LayerStreamer(ckpt, ids)
        for layer in streamer.layers():
            def step(cl: CalibrationLayer):
                stats = cl.collect(cl.linear_names, lambda name, mod: SquaredNormStat())
                ...  # modify weights with cl.set_weight(name, w)
                return cl.state_dict()  # the (possibly modified) tensors to write
            tensors = streamer.run_layer(layer, step)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from weightsmith.core.calibration_data import (  # noqa: F401  (re-exported)
    CalibrationText,
    calibration_windows,
    load_calibration_text,
    load_tokenizer,
    tokenize_windows,
)
from weightsmith.core.calibration_hooks import InputHooks, StopForward
from weightsmith.core.calibration_memo import SubmoduleMemo
from weightsmith.core.device import fast_bfloat16, select_device
from weightsmith.core.experts import (
    expert_groups,
    is_expert_linear,
    unfuse_layer,
)
from weightsmith.core.memory import release_freed_memory
from weightsmith.core.skeleton import (
    assign_state,
    build_skeleton,
    module_path,
)
from weightsmith.core.statistics import STATISTICS, InputStat
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.reader import Checkpoint

T = TypeVar("T")


_StopForward = StopForward  # also raised by the catcher at decoder layer 0


@dataclass
class _Batch:
    hidden: torch.Tensor  # (batch, seq, hidden) in compute dtype
    args: tuple  # positional arguments after hidden_states, as transformers passed them
    kwargs: dict  # keyword arguments (position_embeddings, attention_mask, ...)
    # per decoder layer, where layers differ (config.layer_types: sliding vs full attention)
    layer_kwargs: dict[int, dict] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the layer view
class CalibrationLayer:
    """One materialised decoder layer, handed to a :meth:`LayerStreamer.run_layer` callback.

    Linear names are relative to the layer (``self_attn.q_proj``); weights are exchanged in
    ``(out_features, in_features)`` layout whatever the storage (GPT-2's Conv1D is transposed).
    """

    def __init__(self, streamer: LayerStreamer, index: int, prefix: str, module: nn.Module):
        self.index = index
        self.prefix = prefix  # checkpoint name prefix, e.g. "model.layers.3."
        self.module = module
        self._streamer = streamer
        self._transposed = streamer.ckpt.arch.linear_layout == "in_out"
        self.linears: dict[str, nn.Module] = {
            name: m for name, m in module.named_modules() if _is_linear(m)
        }

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(self.linears)

    @property
    def sequential_groups(self) -> list[tuple[str, ...]]:
        """The layer's Linears in execution order, grouped (q/k/v -> o -> gate/up -> down), from
        the architecture description; Linears it does not name come last, one group."""
        groups = [
            tuple(n for n in g if n in self.linears)
            for g in self._streamer.ckpt.arch.sequential_linears
        ]
        groups = [g for g in groups if g] + expert_groups(self._streamer.ckpt.arch, [*self.linears])
        named = {n for g in groups for n in g}
        rest = tuple(n for n in self.linears if n not in named)
        return groups + ([rest] if rest else [])

    def tensor_name(self, linear: str) -> str:
        """The checkpoint name of a Linear's weight."""
        return f"{self.prefix}{linear}.weight"

    def weight(self, linear: str) -> torch.Tensor:
        """A copy of a Linear's weight as ``(out, in)``, in the compute dtype."""
        w = self.linears[linear].weight.detach()
        return (w.t() if self._transposed else w).clone()

    def weight_shape(self, linear: str) -> tuple[int, int]:
        """A Linear's weight shape as ``(out, in)``."""
        shape = tuple(self.linears[linear].weight.shape)
        return (shape[1], shape[0]) if self._transposed else (shape[0], shape[1])

    @property
    def stored_transposed(self) -> bool:
        """Whether Linear weights are stored ``(in, out)`` (GPT-2's Conv1D)."""
        return self._transposed

    def weight_storage(self, linear: str) -> torch.Tensor | None:
        """The Linear's weight storage itself as ``(out, in)`` when it is a contiguous float32
        CPU tensor stored that way (a kernel may then write a new weight in place); else None."""
        p = self.linears[linear].weight.detach()
        if self._transposed or p.dtype != torch.float32 or p.device.type != "cpu":
            return None
        return p if p.is_contiguous() else None

    def set_weight(self, linear: str, w: torch.Tensor) -> None:
        """Replace a Linear's weight, given as ``(out, in)``; later forwards use it."""
        p = self.linears[linear].weight
        new = w.t() if self._transposed else w
        if tuple(new.shape) != tuple(p.shape):
            raise ValueError(
                f"{linear}: weight shape {tuple(w.shape)} does not fit {tuple(p.shape)}"
            )
        with torch.no_grad():
            p.copy_(new.to(p.dtype))

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The layer's tensors under their checkpoint names (stored dtype unless ``dtype``)."""
        out = {}
        for rel, t in self.module.state_dict().items():
            name = self.prefix + rel
            info = self._streamer.ckpt.tensors.get(name)
            if info is None:
                continue  # a buffer transformers rebuilds itself
            out[name] = t.detach().to(dtype or info.torch_dtype).clone()
        return out

    def collect(
        self, names: Sequence[str], make_stat: str | Callable[[str, nn.Module], InputStat]
    ) -> dict[str, InputStat]:
        """Run the layer (current weights) over every calibration batch and feed the inputs of
        the Linears ``names`` to fresh statistics: the registered statistic ``make_stat``
        (a name in :data:`~weightsmith.core.statistics.STATISTICS`, e.g. ``"hessian"``), or
        ``make_stat(name, module)``. Each batch's forward stops as soon as all of them have
        seen their input; Linears fed the very same input tensor (q/k/v) share one registered
        statistic (see :mod:`.calibration_hooks`)."""
        if isinstance(make_stat, str):
            if make_stat not in STATISTICS:
                raise ConfigError(f"unknown calibration statistic {make_stat!r}")
            cls = STATISTICS[make_stat]
            stats = {n: cls(self.weight_shape(n)[1]) for n in names}
        else:
            stats = {n: make_stat(n, self.linears[n]) for n in names}
        # MoE experts run only on the tokens routed to them: never stop a batch early there
        early = not any(is_expert_linear(self._streamer.ckpt.arch, n) for n in names)
        hooks = InputHooks(stats, early=early, share=early and isinstance(make_stat, str))
        handles = [self.module.register_forward_pre_hook(hooks.start_batch)]
        for n in names:

            def hook(mod: nn.Module, args: tuple, n: str = n) -> None:
                hooks.hook(n, args[0])

            handles.append(self.linears[n].register_forward_pre_hook(hook))
        try:
            self._streamer._forward_all(self.module, keep=False, collecting=names)
        finally:
            for h in handles:
                h.remove()
        return hooks.finish()


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


# ----------------------------------------------------------------------------- the engine
CALIB_DTYPES = ("auto", "float32", "bfloat16")


def check_calib_dtype(name: str) -> None:
    """Refuse a ``--calib-dtype`` that is not one of :data:`CALIB_DTYPES`."""
    if name not in CALIB_DTYPES:
        raise ConfigError(f"--calib-dtype must be one of {', '.join(CALIB_DTYPES)} (got {name!r})")


def calibration_dtype(name: str, ckpt: Checkpoint, device: torch.device) -> torch.dtype:
    """The dtype calibration forwards run in (``--calib-dtype``): ``auto`` is bfloat16 when
    every floating tensor of the decoder layers is stored in bfloat16 and ``device`` runs
    bfloat16 natively (:func:`~weightsmith.core.device.fast_bfloat16`), as llm-compressor
    calibrates such a checkpoint in its own dtype; else float32. Statistics are accumulated
    in float32 either way."""
    check_calib_dtype(name)
    if name != "auto":
        return getattr(torch, name)
    stored = {
        ckpt.info(n).torch_dtype
        for names in ckpt.layers().values()
        for n in names
        if ckpt.info(n).torch_dtype.is_floating_point
    }
    return torch.bfloat16 if stored == {torch.bfloat16} and fast_bfloat16(device) else torch.float32


class LayerStreamer:
    """Feeds calibration tokens through a checkpoint one decoder layer at a time.

    ``input_ids``: ``(n, seq)`` calibration token windows. ``batch_size`` windows are run per
    forward call. Layers must be run in order (each consumes the previous one's outputs).
    ``model``: the checkpoint's :func:`build_skeleton`, when the caller has built it already
    (it becomes the streamer's: layers are materialised in it).
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        input_ids: torch.Tensor,
        *,
        batch_size: int = 8,
        compute_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        progress: bool = False,
        model: nn.Module | None = None,
    ) -> None:
        self.ckpt = ckpt
        self.compute_dtype = compute_dtype
        self.device = select_device(device) if isinstance(device, str) else torch.device(device)
        self.progress = progress
        self._memo: SubmoduleMemo | None = None  # of the layer being run
        self._layer_names = ckpt.layers()
        if not self._layer_names:
            raise CheckpointError(f"{ckpt.path}: no decoder layers found to calibrate")
        self.model = model if model is not None else build_skeleton(ckpt)
        self._next = min(self._layer_names)
        self._batches = self._embed(input_ids, batch_size)

    @property
    def tokens(self) -> int:
        return sum(b.hidden.shape[0] * b.hidden.shape[1] for b in self._batches)

    def layers(self) -> list[int]:
        """Decoder-layer indices in the order they must be run."""
        return list(self._layer_names)

    def hidden_states(self) -> torch.Tensor:
        """The current hidden states (inputs of the next layer), ``(n, seq, hidden)``."""
        return torch.cat([b.hidden for b in self._batches])

    # ------------------------------------------------------------------ running
    def run_layer(self, index: int, fn: Callable[[CalibrationLayer], T]) -> T:
        """Materialise layer ``index``, call ``fn`` on it, then propagate the calibration
        activations through the (possibly modified) layer. Returns what ``fn`` returned."""
        if index != self._next:
            raise RuntimeError(f"layers must run in order: expected {self._next}, got {index}")
        names = self._layer_names[index]
        prefix = self.ckpt.arch.layer_prefix(names[0]) or ""
        module = self._materialise_layer(prefix, names)
        try:
            layer = CalibrationLayer(self, index, prefix, module)
            self._memo = SubmoduleMemo(module, layer.linears)
            result = fn(layer)
            self._forward_all(module, keep=True)
        finally:
            self._memo = None
            module.to("meta")  # release the layer's memory
            release_freed_memory()
        later = [i for i in self._layer_names if i > index]
        self._next = later[0] if later else -1
        return result

    def run(self, fn: Callable[[CalibrationLayer], T]) -> Iterator[tuple[int, T]]:
        """Run every layer in order: yields ``(index, fn(layer))``."""
        for i in self.layers():
            yield i, self.run_layer(i, fn)

    def _forward_all(self, module: nn.Module, *, keep: bool, collecting: Sequence[str] = ()):
        """Run ``module`` on every batch (``keep``: its outputs become the hidden states),
        reusing unchanged submodule outputs of earlier passes (see :mod:`.calibration_memo`)."""
        memo, busy = self._memo, set(collecting)
        with torch.no_grad():
            for i, b in enumerate(
                tqdm(self._batches, disable=not self.progress, leave=False, desc="forward")
            ):
                try:
                    with memo.active(i, busy, store=not keep) if memo else contextlib.nullcontext():
                        out = module(b.hidden, *b.args, **b.layer_kwargs.get(self._next, b.kwargs))
                except _StopForward:  # a collect() hook has everything it needs
                    continue
                if isinstance(out, tuple):
                    out = out[0]
                if keep:
                    b.hidden = out.detach()

    # ------------------------------------------------------------------ loading
    def _module_path(self, name: str) -> str:
        return module_path(self.model, name, self.ckpt.arch.module_renames)

    def _materialise_layer(self, prefix: str, names: list[str]) -> nn.Module:
        path = self._module_path(prefix)
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(
                f"{self.ckpt.path}: config's model has no module {path!r} for {prefix}*"
            ) from None
        unfuse_layer(module, self.ckpt.arch)  # MoE: one Linear per expert, as stored
        state = {
            n[len(prefix) :]: self.ckpt.get_tensor(n).to(self.device, self.compute_dtype)
            if self.ckpt.info(n).torch_dtype.is_floating_point
            else self.ckpt.get_tensor(n).to(self.device)
            for n in names
        }
        assign_state(module, state, where=f"{self.ckpt.path}: layer {prefix}")
        return module

    def _embed(self, input_ids: torch.Tensor, batch_size: int) -> list[_Batch]:
        """Run the model's own forward up to decoder layer 0 and record what it receives."""
        layer_names = {n for names in self._layer_names.values() for n in names}
        arch = self.ckpt.arch
        outer = [  # a vision tower is not needed to embed text: never read
            n
            for n in self.ckpt.tensors
            if n not in layer_names and n != arch.lm_head and arch.in_text_decoder(n)
        ]
        touched: list[str] = []
        for n in outer:
            mpath = self._module_path(n)
            owner, _, attr = mpath.rpartition(".")
            try:
                mod = self.model.get_submodule(owner)
            except AttributeError:
                continue  # not part of this model class (e.g. a stale buffer): ignore
            if attr not in mod._parameters and attr not in mod._buffers:
                continue
            t = self.ckpt.get_tensor(n)
            if t.is_floating_point():
                t = t.to(self.compute_dtype)
            assign_state(mod, {attr: t.to(self.device)}, where=str(self.ckpt.path), strict=False)
            touched.append(mpath)

        first_prefix = self.ckpt.arch.layer_prefix(self._layer_names[self._next][0]) or ""
        first_path = self._module_path(first_prefix)
        parent_path, _, idx = first_path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        captured: list[_Batch] = []

        # layers of different kinds (gpt-oss: sliding and full attention) get different masks
        types = getattr(self.model.config, "layer_types", None) or ()
        last = len(parent) - 1 if len(set(types)) > 1 else int(idx)

        class Catcher(nn.Module):
            def __init__(self, index: int) -> None:
                super().__init__()
                self.index = index

            def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                if self.index == int(idx):
                    captured.append(_Batch(hidden.detach(), args, kwargs))
                if last != int(idx):
                    captured[-1].layer_kwargs[self.index] = kwargs
                if self.index == last:
                    raise _StopForward
                return hidden

        originals = {i: parent[i] for i in range(int(idx), last + 1)}
        for i in originals:
            parent[i] = Catcher(i)
        try:
            with torch.no_grad():
                for start in range(0, input_ids.shape[0], batch_size):
                    ids = input_ids[start : start + batch_size].to(self.device)
                    with contextlib.suppress(_StopForward):
                        self.model(input_ids=ids, use_cache=False)
        finally:
            for i, layer in originals.items():
                parent[i] = layer
            for mpath in touched:  # release the embeddings
                owner, _, attr = mpath.rpartition(".")
                mod = self.model.get_submodule(owner)
                if attr in mod._parameters:
                    mod._parameters[attr] = nn.Parameter(
                        torch.empty_like(mod._parameters[attr], device="meta"), requires_grad=False
                    )
        if len(captured) != (input_ids.shape[0] + batch_size - 1) // batch_size:
            raise CheckpointError(f"{self.ckpt.path}: the model never reached decoder layer 0")
        return captured
