"""llmopt's own engine: the layout-wrapped model (``llmopt.distributed``), global-norm clipping, fused optimizer
kernels, AMP with loss scaling; one optimizer step per ``step`` call, no host sync of its own."""
from __future__ import annotations

import torch

from llmopt.data import build_source
from llmopt.distributed.parallelize import parallelize
from llmopt.engines import StepStats, TrainState, prefetch_next, step_batches
from llmopt.instruments import NoiseScale, Stopwatch
from llmopt.optim import build_optimizer, build_scheduler
from llmopt.precision import autocast, fused_optimizer_ok, grad_scaler


def clip_grads_(params, grad_norm: torch.Tensor, max_norm: float) -> None:
    """Scale every gradient by min(1, max_norm / ||g||) with torch's ``clip_grads_with_norm_`` (the norm is
    already global: ``Layout.grad_norm``)."""
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, grad_norm)


class NativeEngine:
    """llmopt's own step: the layout-wrapped model, global-norm clipping, fused optimizer kernels."""

    def build(self, cfg, device: torch.device) -> TrainState:
        layout = parallelize(cfg, device)
        optimizer = build_optimizer(cfg.optimizer, layout.model, cfg.lr, cfg.weight_decay, cfg.optimizer_impl,
                                    fused_optimizer_ok(cfg.precision, cfg.world_size), cfg.adamw_lr)
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
