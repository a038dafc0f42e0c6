"""Reuse a decoder layer's submodule outputs across the calibration passes of that layer.

A true-sequential method runs the layer once per Linear group (q/k/v, o, gate/up, down) and
once more to produce the next layer's inputs. Once o_proj is quantized, ``self_attn`` gets the
same inputs and the same weights in every later pass, so its output (the attention, four
Linears) can be reused instead of recomputed. :class:`SubmoduleMemo` does that for every
direct child of the layer that holds a Linear: a child's output on a batch is reused only if

* none of its parameters or buffers changed (same storage and version counter: every
  in-place write, e.g. :meth:`CalibrationLayer.set_weight`, bumps the counter),
* its arguments are equal (tensors compared by value, ``torch.equal``; others by ``==``),
* neither the stored arguments nor the stored output were modified in place since,
* and none of its Linears is being collected in this pass, nor has any module inside it a
  forward hook of any kind (hooks must see every call).

Otherwise the child runs as usual and its output is stored for the next pass. The layer's
final pass (its outputs are the next layer's inputs) reuses but stores nothing.

The Linears inside those children are memoised the same way, each on its own (and only while
they have no hook themselves): when a child must run again because one of its Linears
changed, the others are not recomputed (q/k/v once o_proj is quantized), and the final pass
reuses gate/up's outputs from down_proj's pass. Their outputs are held up to
:data:`LINEAR_MEMO_BYTES` per layer; past it they are recomputed, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# the most bytes of Linear outputs a layer's memo holds (a child's outputs are not counted:
# they are the size of the hidden states); past it, Linears are simply recomputed
LINEAR_MEMO_BYTES = 512 << 20


def _versions(obj: Any) -> Any:
    """Identity and version counter of every tensor in ``obj`` (nested tuples/lists/dicts)."""
    if isinstance(obj, torch.Tensor):
        return (obj.data_ptr(), obj._version)
    if isinstance(obj, (tuple, list)):
        return tuple(_versions(o) for o in obj)
    if isinstance(obj, dict):
        return tuple((k, _versions(v)) for k, v in obj.items())
    return None


def _hooked(child: nn.Module) -> bool:
    """Whether a module strictly inside ``child`` has a forward (pre-)hook."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in child.modules() if m is not child)


def _own_hooks(child: nn.Module, name: str) -> bool:
    """Whether a memoised Linear (``name`` has a dot) has a hook of its own: it is not reused
    then (a post-hook may rely on the Linear having run)."""
    return "." in name and bool(child._forward_hooks or child._forward_pre_hooks)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a is b:
            return True
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:  # an object whose == is not a truth value: not comparable, recompute
        return False


class SubmoduleMemo:
    """Output memo of the direct children of ``layer`` that hold one of ``linears``
    (``name -> module``, names relative to the layer)."""

    def __init__(self, layer: nn.Module, linears: dict[str, nn.Module]) -> None:
        self.children: dict[str, nn.Module] = {}
        self.holds: dict[str, set[str]] = {}  # child -> the Linears inside it
        for name in linears:
            head = name.split(".")[0]
            if head != name:  # a Linear directly under the layer is not memoised
                self.children.setdefault(head, layer.get_submodule(head))
                self.holds.setdefault(head, set()).add(name)
        for name, mod in linears.items():  # each Linear inside a child, on its own too
            if name.split(".")[0] != name:
                self.children[name], self.holds[name] = mod, {name}
        self.entries: dict[tuple[str, int], tuple] = {}
        self.hits = 0
        self.linear_bytes = 0  # held by the Linears' own entries (capped: LINEAR_MEMO_BYTES)

    def _drop(self, key: tuple[str, int]) -> None:
        out = self.entries.pop(key)[4]
        if "." in key[0] and isinstance(out, torch.Tensor):
            self.linear_bytes -= out.numel() * out.element_size()

    def _room(self, name: str, out: Any) -> bool:
        """Whether a fresh output of ``name`` may be stored: always for a child of the layer;
        for a Linear while the Linears' entries stay within :data:`LINEAR_MEMO_BYTES`."""
        if "." not in name:
            return True
        size = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0
        if not size or self.linear_bytes + size > LINEAR_MEMO_BYTES:
            return False
        self.linear_bytes += size
        return True

    def _state(self, child: nn.Module) -> tuple:
        return tuple(_versions(t) for t in (*child.parameters(), *child.buffers()))

    @contextlib.contextmanager
    def active(self, batch: int, collecting: set[str], store: bool) -> Iterator[None]:
        """Within: the children (except those holding a Linear in ``collecting``) reuse their
        output on batch ``batch`` where allowed; ``store``: record fresh outputs."""
        patched = []
        for name, child in self.children.items():
            if self.holds[name] & collecting or _hooked(child) or _own_hooks(child, name):
                continue
            child.forward = self._wrap(name, child, child.forward, batch, store)
            patched.append(child)
        try:
            yield
        finally:
            for child in patched:
                del child.forward  # back to the class's forward

    def _wrap(self, name: str, child: nn.Module, forward: Any, batch: int, store: bool) -> Any:
        def memo_forward(*args: Any, **kwargs: Any) -> Any:
            key = (name, batch)
            entry = self.entries.get(key)
            if entry is not None:
                state, a, kw, arg_versions, out, out_versions = entry
                if (
                    state == self._state(child)
                    and arg_versions == _versions((a, kw))
                    and out_versions == _versions(out)
                    and _equal(a, args)
                    and _equal(kw, kwargs)
                ):
                    self.hits += 1
                    return out
                self._drop(key)
            out = forward(*args, **kwargs)
            if store and self._room(name, out):
                self.entries[key] = (self._state(child), args, kwargs,
                                     _versions((args, kwargs)), out, _versions(out))  # fmt: skip
            return out

        return memo_forward
