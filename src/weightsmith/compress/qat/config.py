"""Frozen, versioned configs of a QAT or BitNet training run (recorded in the report)."""

from __future__ import annotations

from dataclasses import dataclass, field

from weightsmith.compress.registry import QuantConfig
from weightsmith.core.training.config import check_training_loop
from weightsmith.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: AdamW, linear warm-up + cosine decay, one pass over the data by default."""

    steps: int | None = None  # None: one pass (or --epochs passes) over the data
    epochs: float | None = None
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    warmup_steps: int | None = None  # None: 5% of the steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    kl_weight: float = 0.0  # loss = (1 − w)·CE + w·KL(original ‖ model); 0 = CE only
    version: int = 1

    def __post_init__(self) -> None:
        check_training_loop(self)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ConfigError(f"--kl-weight must be in [0, 1], got {self.kl_weight}")


@dataclass(frozen=True)
class QatConfig:
    """``compress qat``: the conversion's QuantConfig (method rtn) plus training options."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    act_bits: int | None = None  # fake-quantize Linear inputs per token (training only)
    version: int = 1

    def __post_init__(self) -> None:
        if self.quant.method != "rtn":
            raise ConfigError(
                f"compress qat converts with rtn (the scales it trains against), not "
                f"{self.quant.method!r}"
            )
        if self.quant.format not in ("compressed-tensors", "gptq"):
            raise ConfigError(
                f"compress qat writes compressed-tensors or gptq, not {self.quant.format}"
            )
        if self.act_bits is not None and not 2 <= self.act_bits <= 8:
            raise ConfigError(f"--act-bits must be between 2 and 8 (got {self.act_bits})")


@dataclass(frozen=True)
class BitnetConfig:
    """``compress bitnet``: ternary continued training, then the ``bitnet`` format."""

    train: TrainConfig = field(default_factory=TrainConfig)
    lambda_warmup: int = 1000  # steps of λ = step / warmup before full quantization
    use_rms_norm: bool = False  # RMSNorm (no weight) before quantizing each BitLinear input
    linear_class: str = "bitlinear"
    ignore: tuple[str, ...] = ()
    version: int = 1

    def __post_init__(self) -> None:
        if self.lambda_warmup < 0:
            raise ConfigError(f"--lambda-warmup must be >= 0, got {self.lambda_warmup}")
