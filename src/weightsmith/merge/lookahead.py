"""The next tensor's statistics computed beside this one's output (:class:`Lookahead`).

For methods whose ``stream_stored`` computes a tensor's whole-tensor statistics when called
(``stats_ahead``), the statistics of tensor i + 1 run on the compute pool's helper thread
while tensor i's output chunks are made and written, so the pool's workers are not left idle
at the ends of each pass. The bytes written are those of one tensor at a time.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future

import torch

from weightsmith.core.parallel import beside, pool_workers
from weightsmith.io.reader import Checkpoint
from weightsmith.io.writer import TensorSpec
from weightsmith.merge.engine import (
    DEFAULT_CHUNK_ELEMENTS,
    FLOAT_DTYPES,
    can_stream_stored,
    job_source,
)
from weightsmith.merge.methods import get_method
from weightsmith.merge.plan import TensorJob


def early_stream(
    job: TensorJob,
    ckpts: Mapping[str, Checkpoint],
    spec: TensorSpec,
    *,
    device: str = "cpu",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Iterator[torch.Tensor] | None:
    """The native output stream of a job :func:`ahead_eligible` accepts, its whole-tensor
    statistics computed now (what :func:`~weightsmith.merge.engine.produce` would make; pass
    it as ``stream``), or None where its method takes another path for this tensor."""
    src = job_source(job, ckpts, chunk_elements, device)
    return get_method(job.method).stream_stored(src, job.params, spec.dtype)


def ahead_eligible(job: TensorJob, ckpts: Mapping[str, Checkpoint], device: str) -> bool:
    """Whether :func:`early_stream` can compute ``job``'s statistics ahead: a plain merge of
    stored floating-point tensors by a method whose ``stream_stored`` computes them when called
    (``stats_ahead``)."""
    if job.params is None or job.members or job.vocab or not job.method:
        return False
    first = ckpts[job.inputs[0][0]].info(job.inputs[0][1]).torch_dtype
    inputs = [(ckpts[m], n) for m, n in job.inputs]
    return (
        first in FLOAT_DTYPES
        and get_method(job.method).stats_ahead
        and can_stream_stored(inputs, device)
    )


def input_bytes(job: TensorJob, ckpts: Mapping[str, Checkpoint]) -> int:
    """The stored bytes of a job's inputs (what its native stream maps)."""
    return sum(ckpts[m].info(n).nbytes for m, n in job.inputs)


AHEAD_BYTES = 256 << 20  # the inputs of the tensor being written plus the next one's


class Lookahead:
    """The next tensor's statistics computed beside this one's output: once a job's native
    stream is ready (``produce``'s ``on_stream``), the following job's :func:`early_stream`
    runs on the compute pool's helper thread (:func:`~weightsmith.core.parallel.beside`), its
    tasks filling the gaps the output pass leaves; :meth:`take` hands it to that job's
    ``produce``, raising its error there, in order. One job ahead at most, one statistics
    computation at a time (main thread's, then the helper's), and only while both jobs'
    inputs fit ``max_bytes`` (they are mapped at once)."""

    def __init__(
        self,
        jobs: Sequence[TensorJob],
        make: Callable[[TensorJob], Iterator[torch.Tensor] | None],
        eligible: Callable[[TensorJob], bool],
        sizes: Callable[[TensorJob], int],
        max_bytes: int = AHEAD_BYTES,
    ) -> None:
        self._next = {id(a): b for a, b in itertools.pairwise(jobs)}
        self._make, self._eligible, self._sizes, self._max = make, eligible, sizes, max_bytes
        self._pending: tuple[TensorJob, Future] | None = None

    def take(self, job: TensorJob) -> Iterator[torch.Tensor] | None:
        """``job``'s stream made ahead, or None (then ``produce`` makes it)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending[0] is not job:  # not reached in a normal run: drop what was made
            _discard(pending[1])
            return None
        return pending[1].result()

    def starter(self, job: TensorJob) -> Callable[[], None]:
        """``produce``'s ``on_stream`` for ``job``: start the next job's statistics."""

        def start() -> None:
            nxt = self._next.get(id(job))
            if nxt is None or self._pending is not None or pool_workers() <= 1:
                return  # one thread: nothing would run beside the output
            if not self._eligible(nxt):
                return
            if self._sizes(job) + self._sizes(nxt) > self._max:
                return
            self._pending = (nxt, beside(lambda: self._make(nxt)))

        return start

    def close(self) -> None:
        """Wait for and release a stream made ahead but not taken (a run that stopped)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            _discard(pending[1])


def _discard(made: Future) -> None:
    with contextlib.suppress(Exception):
        stream = made.result()
        close = getattr(stream, "close", None)
        if close is not None:
            close()
