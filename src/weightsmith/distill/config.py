"""Frozen, versioned configs of a distillation run (recorded in the output's provenance)."""

from __future__ import annotations

from dataclasses import dataclass, field

from weightsmith.core.training.config import OPTIMIZERS, check_training_loop
from weightsmith.distill.dpo import DpoSettings
from weightsmith.distill.gkd import check_lmbda
from weightsmith.distill.gold import GoldSettings
from weightsmith.distill.hidden import HiddenSettings
from weightsmith.distill.losses import LossConfig
from weightsmith.distill.registry import DISTILL_METHODS
from weightsmith.errors import ConfigError

# Short names for --lora-targets, expanded to the module names transformers uses.
SHORT_TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


def method_names() -> tuple[str, ...]:
    """The registered distillation methods (built-in ones first)."""
    return tuple(DISTILL_METHODS)


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA student: rank, scale, dropout, which linear layers, rsLoRA scaling."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = "all-linear"  # or a comma list: "q,v", "q_proj,v_proj,dense"
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)
    version: int = 1

    def target_modules(self) -> str | list[str]:
        if self.targets == "all-linear":
            return "all-linear"
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not names:
            raise ConfigError("--lora-targets is empty")
        return [SHORT_TARGETS.get(n, n) for n in names]


@dataclass(frozen=True)
class DistillConfig:
    """Everything that decides what a distillation run computes."""

    method: str = "kd"
    loss: LossConfig = field(default_factory=LossConfig)
    steps: int | None = None  # optimizer steps; None -> from epochs
    epochs: float | None = None  # None with steps None -> 1 epoch
    lr: float = 1e-4
    batch_size: int = 8  # sequences per micro-batch, over all processes
    grad_accum: int = 1
    seq_len: int = 512
    warmup_steps: int | None = None  # None -> 5% of the steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    optim: str = "adamw"
    lora: LoraSettings | None = None
    qlora: bool = False
    save_adapter: bool = False
    gen_max_new_tokens: int = 128  # seqkd/kd --lmbda: completion length
    gen_temperature: float = 1.0  # seqkd/kd --lmbda: sampling temperature (0 = greedy); not τ
    gen_prompt_tokens: int = 16  # seqkd/kd --lmbda on plain text: window tokens used as prompt
    lmbda: float = 0.0  # kd: fraction of micro-batches the student generates (on-policy GKD)
    hidden: HiddenSettings | None = None  # kd: hidden-state loss on layer pairs
    gold: GoldSettings | None = (
        None  # kd --loss gold: term weights, vocabulary map (None: defaults)
    )
    dpo: DpoSettings | None = None  # --method dpo (defaults when None)
    sbs_alpha: float = 0.5  # step-by-step: α·L_label + (1−α)·L_rationale
    version: int = 1

    def __post_init__(self) -> None:
        methods = method_names()
        if self.method not in methods:
            raise ConfigError(f"unknown --method {self.method!r} (choose from {methods})")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"unknown --optim {self.optim!r} (choose from {OPTIMIZERS})")
        check_training_loop(self)
        if (self.qlora or self.save_adapter) and self.lora is None:
            flag = "--qlora" if self.qlora else "--save-adapter"
            raise ConfigError(f"{flag} needs a LoRA student (--lora-r)")
        if self.dpo is not None and self.method != "dpo":
            raise ConfigError(f"DPO settings given for --method {self.method}")
        check_lmbda(self.lmbda)
        if self.lmbda > 0 and self.method != "kd":
            raise ConfigError(f"--lmbda (on-policy GKD) is for distill kd, not {self.method}")
        if self.hidden is not None and self.method != "kd":
            raise ConfigError(f"--hidden-layers is for distill kd, not {self.method}")
        if self.gold is not None and (self.method != "kd" or self.loss.loss != "gold"):
            raise ConfigError("--gold-* options are for distill kd --loss gold")
        if self.gen_max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.gen_max_new_tokens}")
        if self.gen_temperature < 0:
            raise ConfigError(f"--gen-temperature must be >= 0, got {self.gen_temperature}")
        if not 0.0 <= self.sbs_alpha <= 1.0:
            raise ConfigError(f"--alpha must be in [0, 1], got {self.sbs_alpha}")
        if self.lora is not None and self.lora.r < 1:
            raise ConfigError(f"--lora-r must be at least 1, got {self.lora.r}")
        if self.lora is not None and not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora.dropout}")
