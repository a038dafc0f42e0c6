"""What a merge method is, and the registry that ``@merge_method("name")`` fills.

A method is pure tensor code in two steps so the engine can stream big tensors in chunks:
``prepare`` may scan the inputs once or more for whole-tensor statistics (SLERP's norms, TIES'
top-k threshold) and ``combine`` turns one aligned chunk of every input into that chunk of the
output. Running both on a single chunk is the plain whole-tensor function (see
:func:`merge_tensors`), so the tests of the formulas and the streaming engine share one code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from weightsmith.core.parallel import pmap, sub_ranges
from weightsmith.errors import CheckpointError, ConfigError
from weightsmith.io.direct import aligned_empty
from weightsmith.io.reader import drop_mapped_pages
from weightsmith.merge.params import Param


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved for one output tensor: global ones and one mapping per model input.

    ``models`` lines up with the non-base inputs (all inputs for methods without a base).
    ``has_base``: whether input 0 is a base (None: the method's ``needs_base``; methods with an
    optional base, like nuslerp, are told). ``compute_dtype``: the dtype mergekit does the
    arithmetic in (the recipe's ``dtype``, else the inputs'); None is float32, the exact paths.
    """

    name: str
    globals: Mapping[str, Any] = field(default_factory=dict)
    models: tuple[Mapping[str, Any], ...] = ()
    model_names: tuple[str, ...] = ()  # the models' paths, when known (for error messages)
    has_base: bool | None = None
    compute_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the arithmetic (float32 unless a narrower one was asked for)."""
        return self.compute_dtype or torch.float32

    @property
    def narrow(self) -> bool:
        """True when the arithmetic follows mergekit in a dtype other than float32."""
        return self.dtype != torch.float32

    def model_values(self, key: str) -> list[float]:
        return [float(m[key]) for m in self.models]

    def model_label(self, k: int) -> str:
        """How errors name non-base model ``k``: its path when known, else its position."""
        if k < len(self.model_names):
            return self.model_names[k]
        return f"model {k + 1}"


class ChunkSource:
    """Aligned flat chunks of a method's inputs (float32, on the compute device).

    ``chunks(indices)`` yields, for each chunk, a list with one tensor per requested input;
    every call starts again at the first element, so ``prepare`` can take several passes.
    Chunks are read-only: a source may hand the same tensors to several passes.
    """

    name: str
    numel: int
    shape: tuple[int, ...]
    num_inputs: int

    def chunks(self, indices: Sequence[int] | None = None) -> Iterator[list[torch.Tensor]]:
        raise NotImplementedError

    def stored(self, i: int) -> contextlib.AbstractContextManager[torch.Tensor]:
        """Input ``i`` as stored (file dtype, whole, flat, read-only, not yet checked for
        NaN/Inf) inside the ``with`` block: what :meth:`MergeMethod.stream_stored` reads."""
        raise NotImplementedError

    def fail_nonfinite(self, i: int) -> None:
        """Raise the error for NaN/Inf found in input ``i`` by a method's own scan."""
        raise CheckpointError(f"tensor {self.name!r}: input {i} holds NaN or Inf values")

    def whole_stored(self, i: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Input ``i`` as one flat ``dtype`` tensor copied straight from storage that already
        holds ``dtype`` (NaN/Inf checked), or None when this source has no such shortcut."""
        return None


def fail_overflow(name: str, dtype: torch.dtype) -> None:
    """Raise the error for a merged output that holds NaN/Inf although its inputs are finite."""
    kind = str(dtype).removeprefix("torch.")
    wider = " or pass --dtype float32" if dtype in (torch.float16, torch.bfloat16) else ""
    raise CheckpointError(
        f"tensor {name!r}: merged values overflow {kind} (Inf); lower the weights / lambda / t"
        f"{wider}"
    )


class TensorChunks(ChunkSource):
    """In-memory inputs cut into ``chunk_size``-element pieces (whole tensors by default)."""

    def __init__(
        self, tensors: Sequence[torch.Tensor], name: str = "tensor", chunk_size: int | None = None
    ) -> None:
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ConfigError(f"{name}: inputs have different shapes {sorted(shapes)}")
        self.name = name
        self.shape = tuple(tensors[0].shape)
        self.numel = tensors[0].numel()
        self.num_inputs = len(tensors)
        # float32 copies made once: passes share them, so a method that wrote into its input
        # chunks (the contract says they are read-only) would corrupt its own next pass.
        self._flat = [t.detach().reshape(-1).to(torch.float32, copy=True) for t in tensors]
        self._chunk = max(1, chunk_size or self.numel or 1)

    def chunks(self, indices: Sequence[int] | None = None) -> Iterator[list[torch.Tensor]]:
        idx = list(range(self.num_inputs)) if indices is None else list(indices)
        for start in range(0, max(self.numel, 1), self._chunk):
            stop = min(start + self._chunk, self.numel)
            yield [self._flat[i][start:stop] for i in idx]


class MergeMethod:
    """Base class of a merge method; subclasses set the class attributes and ``combine``.

    Inputs are ordered base first (when ``needs_base``), then the models in recipe order.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    needs_base: ClassVar[bool] = False
    exact_inputs: ClassVar[int | None] = None  # total inputs, base included (SLERP: 2)
    optional_base: ClassVar[bool] = False  # a base is used when the recipe names one
    base_as_input: ClassVar[bool] = False  # the base is one more input (karcher), last
    min_models: ClassVar[int] = 1  # non-base inputs
    whole_tensor: ClassVar[bool] = False  # prepare reduces whole tensors (mergekit's threads)
    # an entry's result depends on other entries of the tensor (top-k, norms, angles, ranks):
    # per-expert Linears that mergekit fuses into one tensor are merged as that one tensor
    tensor_statistics: ClassVar[bool] = False
    # stream_stored computes the statistics when called and returns a stream whose chunks only
    # run native kernels (sphere_native.stream_mapped): the engine may call it for the next
    # tensor on a helper thread while this one's chunks are written (merge/lookahead.py)
    stats_ahead: ClassVar[bool] = False
    max_models: ClassVar[int | None] = None
    global_params: ClassVar[tuple[Param, ...]] = ()
    model_params: ClassVar[tuple[Param, ...]] = ()

    def validate(self, params: TensorParams) -> None:
        """Reject parameter values the formula cannot use (one-line ConfigError)."""

    def prepare(self, src: ChunkSource, params: TensorParams) -> Any:
        """Whole-tensor statistics needed before any output chunk (default: none)."""
        return None

    def combine(
        self, chunks: list[torch.Tensor], state: Any, params: TensorParams, offset: int
    ) -> torch.Tensor:
        """One chunk of the output from the matching (read-only) chunk of every input."""
        raise NotImplementedError

    def stream_stored(
        self, src: ChunkSource, params: TensorParams, out_dtype: torch.dtype
    ) -> Iterator[torch.Tensor] | None:
        """Optional fast path on the inputs as stored (``src.stored(i)``: CPU, float32 or
        bfloat16, one dtype for all inputs, NaN/Inf not yet checked): the output's chunks in
        ``out_dtype``, or None when this method (or this case) has none and the float32 path
        should run."""
        return None

    @classmethod
    def param_names(cls) -> set[str]:
        return {p.name for p in cls.global_params} | {p.name for p in cls.model_params}

    @classmethod
    def declared(cls, name: str) -> Param | None:
        """The declaration of parameter ``name`` (None when the method has no such one)."""
        return next((p for p in (*cls.global_params, *cls.model_params) if p.name == name), None)


MERGE_METHODS: dict[str, type[MergeMethod]] = {}


def merge_method(name: str) -> Callable[[type[MergeMethod]], type[MergeMethod]]:
    """Register a method class under its mergekit name (``@merge_method("ties")``)."""

    def register(cls: type[MergeMethod]) -> type[MergeMethod]:
        if name in MERGE_METHODS:
            raise RuntimeError(f"merge method {name!r} registered twice")
        cls.name = name
        MERGE_METHODS[name] = cls
        return cls

    return register


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``, or a ConfigError listing the known ones."""
    cls = MERGE_METHODS.get(name)
    if cls is None:
        known = ", ".join(sorted([*MERGE_METHODS, "passthrough"]))
        raise ConfigError(f"unsupported merge method {name!r} (supported: {known})")
    return cls()


def run_method(
    method: MergeMethod,
    src: ChunkSource,
    params: TensorParams,
    post: Callable[[torch.Tensor], Any] | None = None,
) -> Iterator[Any]:
    """Stream the output of ``method`` sub-chunk by sub-chunk (float32, or ``post(out)``).

    Each input chunk is cut at fixed element offsets (:func:`~weightsmith.core.parallel.sub_ranges`)
    and the pieces are combined (and passed through ``post``) on the active compute pool, so
    ``combine`` must treat pieces independently, as the chunk contract already requires.
    """
    method.validate(params)
    with mergekit_threads() if method.whole_tensor or params.narrow else contextlib.nullcontext():
        state = method.prepare(src, params)
    offset = 0
    for chunks in src.chunks():
        n = chunks[0].numel()

        def work(r: tuple[int, int], chunks=chunks, start=offset) -> Any:
            a, b = r[0] - start, r[1] - start
            out = method.combine([c[a:b] for c in chunks], state, params, r[0])
            return post(out) if post is not None else out

        yield from pmap(work, sub_ranges(offset, offset + n))
        offset += n


def merge_tensors(
    method: str | MergeMethod,
    tensors: Sequence[torch.Tensor],
    params: TensorParams | None = None,
    *,
    chunk_size: int | None = None,
    **global_params: Any,
) -> torch.Tensor:
    """Merge in-memory tensors with a registered method (input shape; float32 result, or
    the dtype mergekit's operations give with ``params.compute_dtype``).

    ``tensors`` is base first for methods with a base. Extra keyword arguments are global
    parameters (``t=0.3``); per-model ones go in ``params.models``.
    """
    m = get_method(method) if isinstance(method, str) else method
    if params is None:
        params = TensorParams("tensor", global_params, ())
    elif global_params:
        params = dataclasses.replace(params, globals={**params.globals, **global_params})
    params = with_defaults(m, params, len(tensors))
    src = TensorChunks(tensors, params.name, chunk_size)
    parts = list(run_method(m, src, params))
    return torch.cat(parts).reshape(src.shape) if parts else torch.empty(src.shape)


def with_defaults(method: MergeMethod, params: TensorParams, num_inputs: int) -> TensorParams:
    """Fill method defaults and check required parameters and the number of inputs."""
    if method.exact_inputs is not None and num_inputs != method.exact_inputs:
        raise ConfigError(
            f"{method.name} merges exactly {method.exact_inputs} models, got {num_inputs}"
        )
    has_base = method.needs_base if params.has_base is None else params.has_base
    n_models = num_inputs - (1 if has_base else 0)
    if method.needs_base and n_models < 1:
        raise ConfigError(f"{method.name} needs a base model and at least one other model")
    if not method.needs_base and num_inputs < 1:
        raise ConfigError(f"{method.name} needs at least one model")
    _check_count(method, n_models)
    g = dict(params.globals)
    for p in method.global_params:
        if g.get(p.name) is None:
            if p.required:
                raise ConfigError(f"{method.name}: missing required parameter {p.name!r}")
            g[p.name] = p.default
    models = list(params.models) or [{} for _ in range(n_models if method.model_params else 0)]
    if method.model_params and len(models) != n_models:
        raise ConfigError(
            f"{method.name}: got parameters for {len(models)} models, expected {n_models}"
        )
    filled = []
    for k, m in enumerate(models):
        d = dict(m)
        for p in method.model_params:
            if d.get(p.name) is None:
                if p.required:
                    raise ConfigError(
                        f"{method.name}: missing parameter {p.name!r} for model {k + 1}"
                    )
                d[p.name] = p.default
        filled.append(d)
    for p in method.global_params:
        p.check(g[p.name], f"{method.name}: parameter")
    for k, d in enumerate(filled):
        for p in method.model_params:
            p.check(d[p.name], f"{method.name}: model {k + 1}'s parameter")
    return TensorParams(
        params.name,
        g,
        tuple(filled),
        params.model_names,
        has_base=has_base,
        compute_dtype=params.compute_dtype,
    )


def _check_count(method: MergeMethod, n_models: int) -> None:
    """The number of non-base models a method takes (nuslerp: exactly 2)."""
    lo, hi = method.min_models, method.max_models
    if n_models < lo or (hi is not None and n_models > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}-{hi}"
        raise ConfigError(f"{method.name} merges {want} models besides the base, got {n_models}")


# torch's own intra-op thread count, read before a compute pool sets it to 1: what mergekit runs
# with, and what some reductions' rounding depends on (partial sums per thread)
TORCH_THREADS = torch.get_num_threads()


@contextlib.contextmanager
def mergekit_threads() -> Iterator[None]:
    """Whole-tensor statistics with torch's default threads (as mergekit computes them), also
    inside a compute pool (where torch is single-threaded for the per-chunk work)."""
    saved = torch.get_num_threads()
    if saved != TORCH_THREADS:
        torch.set_num_threads(TORCH_THREADS)
    try:
        yield
    finally:
        if saved != TORCH_THREADS:
            torch.set_num_threads(saved)


NATIVE_PIECE = 1 << 20  # elements per native call: big enough that thread hand-offs are cheap
OUT_PIECES = 8  # native pieces per output chunk handed to the writer (16 MB of bfloat16)


@contextlib.contextmanager
def stored_inputs(src: ChunkSource) -> Iterator[list[torch.Tensor]]:
    """Every input as stored (flat, cut to the tensor's planned size) while the block runs."""
    with contextlib.ExitStack() as stack:
        xs = [stack.enter_context(src.stored(i)) for i in range(src.num_inputs)]
        if any(x.numel() < src.numel for x in xs):
            raise RuntimeError(f"{src.name}: stored inputs are smaller than the planned size")
        yield [x[: src.numel] for x in xs]


def stream_native(
    src: ChunkSource,
    out_dtype: torch.dtype,
    kernel: Callable[..., tuple[int, list[int]] | None],
    *,
    offsets: bool = False,
) -> Iterator[torch.Tensor]:
    """The output of a per-entry native kernel, read straight from the stored inputs: chunks of
    ``out_dtype``, each computed in ``NATIVE_PIECE`` pieces on the compute pool by
    ``kernel(input pieces, output piece)`` (``offsets``: also the pieces' flat start) ->
    (NaN/Inf outputs, NaN/Inf per input). A NaN/Inf input raises its input's error, an
    overflowing output the overflow error."""
    with stored_inputs(src) as stored:
        step = OUT_PIECES * NATIVE_PIECE
        for first in range(0, src.numel, step):
            last = min(first + step, src.numel)
            out = aligned_empty(last - first, out_dtype)  # written without a staging copy

            def piece(r: tuple[int, int], out=out, first=first) -> tuple[int, list[int]]:
                pieces, dst = [x[r[0] : r[1]] for x in stored], out[r[0] - first : r[1] - first]
                res = kernel(pieces, dst, r[0]) if offsets else kernel(pieces, dst)
                if res is None:
                    raise RuntimeError(f"{src.name}: native kernel refused its inputs")
                return res

            bad_out = 0
            for n_out, n_in in pmap(piece, sub_ranges(first, last, NATIVE_PIECE)):
                for i, n in enumerate(n_in):
                    if n:
                        src.fail_nonfinite(i)
                bad_out += n_out
            if bad_out:
                fail_overflow(src.name, out_dtype)
            for x in stored:  # the inputs' pages read so far leave the resident set
                drop_mapped_pages(x, first, last)
            yield out


def whole(
    src: ChunkSource,
    i: int,
    dtype: torch.dtype,
    minus: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Input ``i`` as one flat tensor in ``dtype`` (a float32 input rounded as mergekit's load
    cast rounds it), less input ``minus`` when given (``x.to(dtype) - base.to(dtype)``, entry
    by entry: the bits of subtracting the whole tensors), into ``out`` when given. For methods
    whose statistics must be mergekit's whole-tensor reductions bit for bit: one tensor per
    input, held while ``prepare`` runs."""
    if minus is None and out is None:
        direct = src.whole_stored(i, dtype)
        if direct is not None:
            return direct
    pos = 0
    for parts in src.chunks([i] if minus is None else [i, minus]):  # piece by piece
        chunk = parts[0]
        if out is None:
            out = torch.empty(src.numel, dtype=dtype, device=chunk.device)
        piece = out[pos : pos + chunk.numel()]
        if minus is None:
            piece.copy_(chunk)  # a copy: chunks are read-only
        else:
            torch.sub(chunk.to(dtype), parts[1].to(dtype), out=piece)
        pos += chunk.numel()
    return out if out is not None else torch.empty(0, dtype=dtype)
