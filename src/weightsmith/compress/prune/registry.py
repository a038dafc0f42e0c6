"""Pruning configs and the method registry, filled by ``@prune_method("name")``.

A method is one file: a pure scoring function decorated with its name, what it needs
(calibration or not) and which driver runs it (``unstructured``: zeros inside the weights;
``depth``: whole decoder layers removed; ``width``: MLP channels removed). The CLI choices and
the docs table come from :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from weightsmith.core.calibration import check_calib_dtype
from weightsmith.errors import ConfigError

# SparseGPT's dampening (fraction of mean diag(H) added to the diagonal), chosen by held-out
# measurement as GPTQ's: on SmolLM2 (64 x 256 WikiText calibration windows), 0.1 beat 0.01 on
# all four of WikiText / TinyStories ppl at 50 % and 2:4 (BENCHMARKS.md, "SparseGPT dampening
# on held-out text"). llm-compressor and the paper use 0.01 (pass --damp 0.01 to match).
SPARSEGPT_DAMP = 0.1

# SparseGPT's N:M mask rules (compress/prune/sparsegpt.py): "obs" is the default
NM_SELECT = ("obs", "score")

KINDS = ("unstructured", "depth", "width", "experts")


@dataclass(frozen=True)
class PruneMethod:
    """A registered pruning method."""

    name: str
    fn: Callable  # the pure scoring function
    kind: str  # one of KINDS: which driver walks the checkpoint
    needs_calibration: bool
    compare: str = "row"  # unstructured only: "row" (per output row) or "tensor" (whole matrix)
    description: str = ""
    # unstructured only: ``fn(w, hessian, ...)`` prunes *and* updates the kept weights
    # (SparseGPT) instead of returning scores
    updates_weights: bool = False


METHODS: dict[str, PruneMethod] = {}


def prune_method(
    name: str,
    *,
    kind: str,
    needs_calibration: bool,
    compare: str = "row",
    description: str = "",
    updates_weights: bool = False,
) -> Callable[[Callable], Callable]:
    """Register a scoring function as the pruning method ``name``."""
    if kind not in KINDS:
        raise ValueError(f"unknown pruning kind {kind!r}")
    if compare not in ("row", "tensor"):
        raise ValueError(f"unknown comparison group {compare!r}")

    def register(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"pruning method {name!r} registered twice")
        doc = description or (fn.__doc__ or "").strip().splitlines()[0]
        METHODS[name] = PruneMethod(
            name, fn, kind, needs_calibration, compare, doc, updates_weights
        )
        return fn

    return register


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: zero N of every M consecutive inputs."""
    try:
        n_s, m_s = text.split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ConfigError(f"--pattern {text!r}: expected N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise ConfigError(f"--pattern {text!r}: need 0 < N < M")
    return n, m


@dataclass(frozen=True)
class PruneConfig:
    """Options of one pruning run, recorded in the output's ``weightsmith.json``."""

    method: str = "wanda"
    sparsity: float | None = None  # unstructured: fraction zeroed (0.5 when no pattern)
    pattern: tuple[int, int] | None = None  # N:M semi-structured
    ignore: tuple[str, ...] = ()  # Linears to keep dense (lm_head and embeddings always are)
    # calibration (wanda, layers, channels)
    calib: str | None = None
    calib_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    calib_dtype: str = "float32"  # wanda/sparsegpt forwards (core.calibration.calibration_dtype)
    # MoE: experts routed fewer calibration tokens fall back to magnitude (0: never)
    min_expert_tokens: int = 32
    calibrate_all_experts: bool = False
    # sparsegpt
    damp: float = SPARSEGPT_DAMP  # fraction of mean(diag H) added to the Hessian's diagonal
    block_size: int = 128  # columns per lazy-update block (the mask's comparison group)
    nm_select: str = NM_SELECT[0]  # sparsegpt N:M mask rule: exact per group, or the reference's
    # depth (layers)
    drop: int | None = None
    layers: tuple[int, ...] = ()
    # width (channels)
    mlp_ratio: float | None = None
    # MoE experts kept per layer
    keep: int | None = None
    version: int = 1

    @property
    def kind(self) -> str:
        return METHODS[self.method].kind

    @property
    def target_sparsity(self) -> float:
        if self.pattern is not None:
            return self.pattern[0] / self.pattern[1]
        return 0.5 if self.sparsity is None else self.sparsity

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        kind = self.kind
        given = {
            "--sparsity": self.sparsity is not None,
            "--pattern": self.pattern is not None,
            "--drop": self.drop is not None,
            "--layers": bool(self.layers),
            "--mlp-ratio": self.mlp_ratio is not None,
            "--keep": self.keep is not None,
        }
        allowed = {
            "unstructured": {"--sparsity", "--pattern"},
            "depth": {"--drop", "--layers"},
            "width": {"--mlp-ratio"},
            "experts": {"--keep"},
        }[kind]
        wrong = [opt for opt, on in given.items() if on and opt not in allowed]
        if wrong:
            raise ConfigError(f"{wrong[0]} does not apply to --method {self.method}")
        check_calib_dtype(self.calib_dtype)
        masked = kind == "unstructured" and METHODS[self.method].needs_calibration
        if self.calib_dtype != "float32" and not masked:  # wanda, sparsegpt
            raise ConfigError(f"--calib-dtype does not apply to --method {self.method}")
        if self.calib_samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise ConfigError("--calib-samples and --batch-size must be >= 1, --seq-len >= 2")
        tuned = (self.damp, self.block_size) != (SPARSEGPT_DAMP, 128)
        if tuned and not METHODS[self.method].updates_weights:
            raise ConfigError(f"--damp does not apply to --method {self.method}")
        if not 0 <= self.damp < 1 or self.block_size < 1:
            raise ConfigError(f"--damp must be in [0, 1) (got {self.damp}), block_size >= 1")
        if self.nm_select not in NM_SELECT:
            raise ConfigError(f"--nm-select must be one of {', '.join(NM_SELECT)}")
        if self.nm_select != NM_SELECT[0] and not (self.pattern and self.method == "sparsegpt"):
            raise ConfigError("--nm-select applies to --method sparsegpt with --pattern only")
        if self.ignore and kind != "unstructured":
            raise ConfigError(f"--ignore does not apply to --method {self.method}")
        if kind == "unstructured":
            if self.sparsity is not None and self.pattern is not None:
                raise ConfigError("give --sparsity or --pattern, not both")
            if self.sparsity is not None and not 0 < self.sparsity < 1:
                raise ConfigError(f"--sparsity must be in (0, 1) (got {self.sparsity})")
            if self.pattern is not None and not 0 < self.pattern[0] < self.pattern[1]:
                raise ConfigError(f"--pattern {self.pattern}: need 0 < N < M")
        elif kind == "depth":
            if (self.drop is None) == (not self.layers):
                raise ConfigError(f"--method {self.method} needs --drop N or --layers I,J (one)")
            if self.drop is not None and self.drop < 1:
                raise ConfigError(f"--drop must be >= 1 (got {self.drop})")
            if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"--layers {list(self.layers)}: indices must be distinct, >= 0")
        elif kind == "width":
            if self.mlp_ratio is None:
                raise ConfigError(f"--method {self.method} needs --mlp-ratio (e.g. 0.75)")
            if not 0 < self.mlp_ratio < 1:
                raise ConfigError(f"--mlp-ratio must be in (0, 1) (got {self.mlp_ratio})")
