"""The training engine shared by distillation and quantization-aware training, and what it
needs below the subsystems: text data → token examples, token losses, the lr schedule, data
parallelism and the atomic save of a trained model."""

from weightsmith.core.training.config import LoopConfig, check_training_loop
from weightsmith.core.training.engine import (
    SINGLE_PROCESS,
    StepOutput,
    TrainingTask,
    TrainResult,
    make_optimizer,
    micro_batches,
    train,
)

__all__ = [
    "SINGLE_PROCESS",
    "LoopConfig",
    "StepOutput",
    "TrainResult",
    "TrainingTask",
    "check_training_loop",
    "make_optimizer",
    "micro_batches",
    "train",
]
