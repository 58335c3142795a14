"""THE training step, used by the CLI, the harness and the benchmarks alike.

``build(cfg, device)`` makes everything a step needs (the layout-wrapped model, optimizer, learning-rate
schedule, precision, data); ``train_step(state, step)`` runs one optimizer step on the global batch of
``step`` and returns the loss as a tensor with its stats, without synchronising the host: the caller decides
when to read numbers. ``evaluate(state)`` is the held-out loss, forward only, under the same layout.
"""
from __future__ import annotations

import torch

from llmopt.data import build_source
from llmopt.distributed.parallelize import parallelize
from llmopt.engine import Engine, StepStats, TrainState, micro_batches, prefetch_next, step_batches  # noqa: F401 (micro_batches: re-exported)
from llmopt.metrics import NoiseScale, Stopwatch
from llmopt.optim import build_optimizer, build_scheduler, eval_weights
from llmopt.precision import autocast, check_precision, fused_optimizer_ok, grad_scaler


def engine_for(name: str) -> Engine:
    """The engine of ``--engine``; the Accelerate peer is imported only when asked for."""
    if name == "accelerate":
        from llmopt.accelerate_engine import AccelerateEngine

        return AccelerateEngine()
    return NativeEngine()


def build(cfg, device: torch.device) -> TrainState:
    """``cfg`` must be validated (llmopt.config.validate). Collective when distributed."""
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


def clip_grads_(params, grad_norm: torch.Tensor, max_norm: float) -> None:
    """Scale every gradient by min(1, max_norm / ||g||) with torch's ``clip_grads_with_norm_`` (the norm is
    already global: ``Layout.grad_norm``)."""
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, grad_norm)


class NativeEngine:
    """llmopt's own step: the layout-wrapped model, global-norm clipping, fused optimizer kernels."""

    def build(self, cfg, device: torch.device) -> TrainState:
        layout = parallelize(cfg, device)
        optimizer = build_optimizer(cfg.optimizer, layout.model, cfg.lr, cfg.weight_decay, cfg.optimizer_impl,
                                    fused_optimizer_ok(cfg.precision, cfg.world_size))
        source = build_source(cfg.data, cfg.model_config.vocab_size, cfg.seed, cfg.tokenizer)
        noise = NoiseScale(cfg.micro_batch, cfg.global_batch) if cfg.gns else None
        scaler = grad_scaler(cfg.precision, device.type, cfg.world_size)
        return TrainState(cfg, device, layout, optimizer, scaler, source, build_scheduler(optimizer, cfg), noise,
                          prefetch=device.type == "cuda")

    def step(self, state: TrainState, step: int, batches=None) -> StepStats:
        return _native_step(state, step, batches)


def _native_step(state: TrainState, step: int, batches=None) -> StepStats:
    cfg, layout, opt, scaler = state.cfg, state.layout, state.optimizer, state.scaler
    given = batches is not None
    batches = batches if given else step_batches(state, step)
    opt.zero_grad(set_to_none=True)
    small = []  # --gns: the squared norm of the first micro-batch's gradient, taken before the next adds to it
    probe = (lambda: small.append(layout.grad_sq_norm() * len(batches) ** 2)) if state.noise_scale else None
    local_loss = layout.forward_backward(batches, autocast(cfg.precision, state.device.type), scaler, probe)
    if not given:
        prefetch_next(state, step)  # while the device works through the backward pass
    layout.finish_grads()
    if scaler is not None:
        scaler.unscale_(opt)  # the inf check is global: see llmopt.precision.grad_scaler
    grad_norm = layout.grad_norm()
    if state.noise_scale is not None:
        state.noise_scale.update(layout.dp_mean(small[0]), grad_norm**2)
    if cfg.max_grad_norm > 0:
        clip_grads_(layout.parameters(), grad_norm, cfg.max_grad_norm)
    skipped = False
    if scaler is not None:
        scale_before = scaler.get_scale()  # host sync, fp16 only: the skip count is a reported figure
        with Stopwatch(state.device) as update:
            scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < scale_before
    else:
        with Stopwatch(state.device) as update:
            opt.step()
    if state.scheduler is not None:
        state.scheduler.step()
    return StepStats(layout.global_loss(local_loss), grad_norm, cfg.global_batch * cfg.seq_len, skipped, update)
