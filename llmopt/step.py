"""THE training step, used by the CLI, the harness and the benchmarks alike (the engines that run it:
``llmopt.engines``, llmopt's own in ``llmopt.engines.native``).

``build(cfg, device)`` makes everything a step needs (the layout-wrapped model, optimizer, learning-rate
schedule, precision, data); ``train_step(state, step)`` runs one optimizer step on the global batch of
``step`` and returns the loss as a tensor with its stats, without synchronising the host: the caller decides
when to read numbers. ``evaluate(state)`` is the held-out loss, forward only, under the same layout.
"""
from __future__ import annotations

import torch

from llmopt.core.config import TrainConfig
from llmopt.engines import Engine, StepStats, TrainState, micro_batches  # noqa: F401 (micro_batches: re-exported)
from llmopt.engines.native import NativeEngine
from llmopt.optim import eval_weights
from llmopt.precision import autocast, check_precision


def engine_for(name: str) -> Engine:
    """The engine of ``--engine``; the Accelerate peer is imported only when asked for."""
    if name == "accelerate":
        from llmopt.engines.accelerate import AccelerateEngine

        return AccelerateEngine()
    return NativeEngine()


def build(cfg: TrainConfig, device: torch.device) -> TrainState:
    """``cfg`` must be validated (llmopt.core.config.validate). Collective when distributed."""
    check_precision(cfg.precision, device.type)
    engine = engine_for(cfg.engine)
    state = engine.build(cfg, device)
    state.engine = engine
    return state


def train_step(state: TrainState, step: int, batches=None) -> StepStats:
    """One optimizer step on the global batch of ``step`` (or the given micro-batches), by the state's engine."""
    return state.engine.step(state, step, batches)


@torch.no_grad()
def evaluate(state: TrainState) -> torch.Tensor:
    """Mean loss over ``eval_batches`` fixed global batches of the held-out split (the same batches at every
    eval), forward only, under the run's layout and precision, at the weights the optimizer evaluates
    (``eval_weights``: a schedule-free optimizer's average); the same 0-dim value on every rank."""
    cfg = state.cfg
    amp = autocast(cfg.precision, state.device.type)
    total = torch.zeros((), device=state.device)
    with eval_weights(state.optimizer):
        for i in range(cfg.eval_batches):
            total += state.layout.eval_loss(micro_batches(state, i, split="val"), amp)
    return state.layout.global_loss(total / cfg.eval_batches)
