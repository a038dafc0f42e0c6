"""The shared training engine on a one-parameter model, against hand-computed updates: global
token normalisation across accumulated micro-batches, the lr schedule, clipping, the sampler,
the evaluation hooks — and the distillation-method registry that dispatches onto it."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.core.training import LoopConfig, StepOutput, micro_batches, train
from weightsmith.core.training.schedule import lr_factor
from weightsmith.errors import ConfigError

# examples of "tokens": the loss of a token x is (w − x)², summed and divided by the step's count
EXAMPLES = [[1.0], [2.0, 4.0], [3.0, 5.0, 7.0]]


class Scalar(torch.nn.Module):
    def __init__(self, w: float = 0.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))


class SquaredError:
    """Σ_tokens (w − x)² / normaliser; records the micro-batches and normalisers it saw."""

    def __init__(self, model: Scalar, examples=EXAMPLES) -> None:
        self.model, self.examples = model, examples
        self.seen: list[tuple[list[int], int]] = []

    def batch(self, indices):
        return torch.tensor([x for i in indices for x in self.examples[i]], dtype=torch.float64)

    def count(self, batch) -> int:
        return batch.numel()

    def step(self, batch, indices, normaliser) -> StepOutput:
        self.seen.append((list(indices), normaliser))
        return StepOutput(((self.model.w - batch) ** 2).sum() / normaliser, batch.numel())


class Linear:
    """loss = c·w: a constant gradient c, so SGD moves w by exactly lr_t · c each step."""

    def __init__(self, model: Scalar, c: float) -> None:
        self.model, self.c = model, c

    def batch(self, indices):
        return indices

    def count(self, batch) -> int:
        return 1

    def step(self, batch, indices, normaliser) -> StepOutput:
        return StepOutput(self.c * self.model.w / normaliser, 1)


def _sgd(model: Scalar, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def test_accumulated_update_is_normalised_by_the_steps_tokens():
    """3 micro-batches (1, 2 and 3 tokens) in one step: the gradient is Σ 2(w − x) / 6 over all
    six tokens — not the mean of the three micro-batch means."""
    model = Scalar(0.0)
    task = SquaredError(model)
    loop = LoopConfig(lr=0.3, batch_size=1, grad_accum=3, steps=1, warmup_steps=0,
                      max_grad_norm=None)  # fmt: skip
    res = train(model, task, 3, loop, optimizer=_sgd(model, 0.3), progress=False)
    assert sorted(i for idx, _ in task.seen for i in idx) == [0, 1, 2]
    assert [n for _, n in task.seen] == [6, 6, 6]
    # grad = Σ 2(0 − x)/6 = −2·22/6 = −22/3; lr factor at step 0 of 1 (no warm-up) is 1
    assert model.w.item() == pytest.approx(0.3 * 22 / 3, abs=1e-12)
    assert res.losses == [pytest.approx((1 + 4 + 16 + 9 + 25 + 49) / 6, abs=1e-6)]
    assert res.units == 6 and res.tokens == 6 and res.steps == 1


def test_clipping_scales_the_gradient_to_max_norm():
    model = Scalar(0.0)
    loop = LoopConfig(lr=0.3, batch_size=1, grad_accum=3, steps=1, warmup_steps=0,
                      max_grad_norm=1.0)  # fmt: skip
    train(model, SquaredError(model), 3, loop, optimizer=_sgd(model, 0.3), progress=False)
    # |g| = 22/3 > 1: g ← g · 1/(|g| + 1e-6), so the step is 0.3 · (22/3)/(22/3 + 1e-6)
    assert model.w.item() == pytest.approx(0.3 * (22 / 3) / (22 / 3 + 1e-6), abs=1e-12)


def test_schedule_values_and_the_lr_the_engine_applies():
    # warm-up 2 of 6 steps, then cosine to min_ratio 0.1 over the remaining 4
    expected = [0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
                0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4))]  # fmt: skip
    got = [lr_factor(s, 6, 2, 0.1) for s in range(6)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert lr_factor(5, 6, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)), abs=1e-12)
    # the engine sets lr · factor(step) before each step: SGD on a constant gradient c = 2
    model = Scalar(0.0)
    loop = LoopConfig(lr=0.1, batch_size=1, steps=6, warmup_steps=2, min_lr_ratio=0.1,
                      max_grad_norm=None)  # fmt: skip
    calls: list[tuple[int, int]] = []
    train(model, Linear(model, 2.0), 4, loop, optimizer=_sgd(model, 0.1), progress=False,
          on_step=lambda step, total: calls.append((step, total)))  # fmt: skip
    assert model.w.item() == pytest.approx(-sum(0.1 * f * 2.0 for f in expected), abs=1e-12)
    assert calls == [(s, 6) for s in range(6)]


def test_evaluation_hooks_run_before_the_first_and_after_the_last_step():
    model = Scalar(0.0)
    loop = LoopConfig(lr=0.5, batch_size=1, steps=2, warmup_steps=0, max_grad_norm=None)
    res = train(model, Linear(model, 1.0), 1, loop, optimizer=_sgd(model, 0.5), progress=False,
                evaluate=lambda: {"w": model.w.item()})  # fmt: skip
    # step 0: lr · 1 = 0.5; step 1 of 2: cosine at progress 1/2, 0.5·(1 + cos π/2) = 0.5
    assert res.eval_before == {"w": 0.0}
    assert res.eval_after == {"w": pytest.approx(-0.5 - 0.5 * 0.5 * (1 + math.cos(math.pi / 2)))}


def test_sampler_reshuffles_every_epoch_and_covers_each_example_once():
    first = [i for _, b in zip(range(5), micro_batches(5, 2, seed=3), strict=False) for i in b]
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    assert first[:5] != first[5:10]  # a new permutation for the second epoch (seed 3)
    again = [i for _, b in zip(range(5), micro_batches(5, 2, seed=3), strict=False) for i in b]
    assert again == first


def test_loop_config_steps_and_warmup():
    loop = LoopConfig(lr=1e-3, batch_size=4, grad_accum=2)
    assert loop.total_steps(41) == 6  # ceil(41 / 8): one pass
    assert LoopConfig(lr=1e-3, batch_size=4, epochs=2.5).total_steps(10) == 7  # ceil(25 / 4)
    assert LoopConfig(lr=1e-3, batch_size=4, steps=3).total_steps(1000) == 3
    assert loop.warmup(100) == 5 and LoopConfig(lr=1, batch_size=1, warmup_steps=0).warmup(9) == 0


def test_a_model_without_trainable_parameters_is_refused():
    model = Scalar(0.0).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train(model, Linear(model, 1.0), 1, LoopConfig(lr=1, batch_size=1, steps=1),
              progress=False)  # fmt: skip


def test_a_registered_distillation_method_is_dispatched(tmp_path):
    """A new method is one decorated function: distill() and DistillConfig find it in the
    registry, and inputs it does not declare are refused with the methods that take them."""
    from weightsmith.distill import DISTILL_METHODS, DistillConfig, distill, distill_method

    calls = []

    @distill_method("echo", inputs=("eval_data",))
    def echo(run):
        """Return what it was given (a test method)."""
        calls.append(run)
        return "trained"

    try:
        cfg = DistillConfig(method="echo", steps=1)
        assert distill(None, "s", "d", tmp_path / "o", cfg, eval_data="e") == "trained"
        assert calls[0].eval_data == "e" and calls[0].cfg is cfg
        assert DISTILL_METHODS["echo"].summary == "Return what it was given (a test method)."
        with pytest.raises(ConfigError, match="--teacher is for --method kd or seqkd, not echo"):
            distill("t", "s", "d", tmp_path / "o", cfg)
        with pytest.raises(RuntimeError, match="registered twice"):
            distill_method("echo")(echo)
    finally:
        DISTILL_METHODS.pop("echo")
    with pytest.raises(ConfigError, match="unknown --method 'echo'"):
        DistillConfig(method="echo")
