"""The forward hooks behind :meth:`~weightsmith.core.calibration.CalibrationLayer.collect`:
each batch's Linear inputs go to their statistics, and the forward stops once every statistic
has what it needs.

Linears that receive the *very same* input tensor (q/k/v after the attention norm, gate/up
after the MLP norm) share one accumulation: the first of them feeds its statistic, the others
get an exact copy at the end. Which Linears share is learnt on the first batch (same storage,
same shape, strides and version counter, the tensor held alive, so the test is identity, not
a value comparison) and checked on every later batch where they still run. From the second
batch on, a batch stops as soon as the first Linear of every sharing set has been seen, so the
Linears in between (q and k before v; gate before up) are not run for nothing. Statistics
are float sums, so a copy is bit-identical to accumulating the same inputs again.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class StopForward(Exception):
    """Raised by a hook once the rest of the layer's forward is not needed."""


class InputHooks:
    """Feeds Linear inputs to ``stats`` (name -> statistic), batch by batch.

    ``early``: stop each batch's forward once all statistics are fed. ``share``: let Linears
    with the same input share one statistic (only for statistics built identically for the
    same input width, i.e. registered ones)."""

    def __init__(self, stats: dict[str, Any], *, early: bool, share: bool) -> None:
        self.stats, self.early, self.share = stats, early, share
        self.alias: dict[str, str] = {}  # name -> the name whose statistic it copies
        self.batches = 0
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # this batch: input -> first
        self._fed: set[str] = set()

    def start_batch(self, *_: Any) -> None:
        """A forward pre-hook of the layer module: a new batch starts."""
        self.batches += 1
        self._seen.clear()
        self._fed.clear()

    def hook(self, name: str, x: torch.Tensor) -> None:
        """The forward pre-hook of Linear ``name`` with its input ``x``."""
        x = x.detach()
        first = self._owner(name, x) if self.share else None
        if first is None:
            self.stats[name].add(x.reshape(-1, x.shape[-1]).float())
        self._fed.add(name)
        if self.early and self._done():
            self._seen.clear()  # release the held inputs before unwinding
            raise StopForward

    def _owner(self, name: str, x: torch.Tensor) -> str | None:
        """The Linear that already fed this very tensor in this batch (None: ``name`` feeds
        it itself). Learns the sharing on the first batch, checks it on later ones."""
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)
        hit = self._seen.get(key)
        owner = hit[0] if hit is not None and hit[0] != name else None
        if self.batches <= 1:
            if owner is not None:
                self.alias[name] = owner
        elif owner != self.alias.get(name):
            raise RuntimeError(
                f"calibration: {name} shared its input with {self.alias.get(name)} on the "
                f"first batch but not on batch {self.batches}"
            )
        if owner is None:
            self._seen.setdefault(key, (name, x))  # held: its storage cannot be reused
        return owner

    def _done(self) -> bool:
        if self.batches <= 1:  # the sharing is still being learnt: see every Linear
            return len(self._fed) == len(self.stats)
        return all(n in self._fed for n in self.stats if n not in self.alias)

    def finish(self) -> dict[str, Any]:
        """The statistics, the shared ones copied: each can be handed over on its own."""
        self._seen.clear()
        for name, owner in self.alias.items():
            self.stats[name] = copy.deepcopy(self.stats[owner])
        return self.stats
