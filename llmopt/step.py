"""THE training step, used by the CLI, the harness and the benchmarks alike.

``build(cfg, device)`` makes everything a step needs (the layout-wrapped model, optimizer, learning-rate
schedule, precision, data); ``train_step(state, step)`` runs one optimizer step on the global batch of
``step`` and returns the loss as a tensor with its stats, without synchronising the host: the caller decides
when to read numbers. ``evaluate(state)`` is the held-out loss, forward only, under the same layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from llmopt.data import build_source, shard_rows
from llmopt.distributed.parallelize import Layout, parallelize
from llmopt.metrics import NoiseScale
from llmopt.optim import build_optimizer, build_scheduler
from llmopt.precision import autocast, check_precision, grad_scaler


@dataclass
class StepStats:
    loss: torch.Tensor        # global-batch mean loss, a 0-dim tensor (same value on every rank)
    grad_norm: torch.Tensor   # global gradient norm before clipping
    tokens: int               # tokens in the global batch
    fp16_skipped: bool        # fp16: the scaler found inf/NaN gradients and skipped the update


@dataclass
class TrainState:
    cfg: object
    device: torch.device
    layout: Layout
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    source: object
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    noise_scale: NoiseScale | None = None  # --gns: running estimate of the gradient noise scale

    @property
    def model(self):
        return self.layout.model


def build(cfg, device: torch.device) -> TrainState:
    """``cfg`` must be validated (llmopt.config.validate). Collective when distributed."""
    check_precision(cfg.precision, device.type)
    if cfg.engine == "accelerate":  # the peer engine builds its own loop (llmopt/accelerate_engine.py)
        from llmopt import accelerate_engine

        return accelerate_engine.build(cfg, device)
    layout = parallelize(cfg, device)
    optimizer = build_optimizer(cfg.optimizer, layout.model, cfg.lr, cfg.weight_decay, cfg.optimizer_impl)
    source = build_source(cfg.data, cfg.model_config.vocab_size, cfg.seed, cfg.tokenizer)
    noise = NoiseScale(cfg.micro_batch, cfg.global_batch) if cfg.gns else None
    return TrainState(cfg, device, layout, optimizer, grad_scaler(cfg.precision, device.type), source,
                      build_scheduler(optimizer, cfg), noise)


def micro_batches(state: TrainState, step: int, split: str = "train") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's accumulation micro-batches of the global batch of ``step``: only its data-parallel rows
    are built, split ``grad_accum`` ways. Each row depends on (seed, split, step, row) alone. On CUDA the
    batch is pinned and copied without blocking the host."""
    cfg = state.cfg
    rows = shard_rows(cfg.global_batch, state.layout.coord["dp"], cfg.dp)
    x, y = state.source.batch(step, cfg.global_batch, cfg.seq_len, rows=rows, split=split)
    cuda = state.device.type == "cuda"
    out = []
    for i in range(cfg.grad_accum):
        r = shard_rows(len(rows), i, cfg.grad_accum)
        xs, ys = x[r.start : r.stop], y[r.start : r.stop]
        if cuda:
            xs, ys = xs.pin_memory(), ys.pin_memory()
        out.append((xs.to(state.device, non_blocking=cuda), ys.to(state.device, non_blocking=cuda)))
    return out


@torch.no_grad()
def evaluate(state: TrainState) -> torch.Tensor:
    """Mean loss over ``eval_batches`` fixed global batches of the held-out split (the same batches at every
    eval), forward only, under the run's layout and precision; the same 0-dim value on every rank."""
    cfg = state.cfg
    amp = autocast(cfg.precision, state.device.type)
    total = torch.zeros((), device=state.device)
    for i in range(cfg.eval_batches):
        total += state.layout.eval_loss(micro_batches(state, i, split="val"), amp)
    return state.layout.global_loss(total / cfg.eval_batches)


def clip_grads_(params, grad_norm: torch.Tensor, max_norm: float) -> None:
    """Scale every gradient by min(1, max_norm / ||g||), on local shards (the norm is already global)."""
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    coef = (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))


def train_step(state: TrainState, step: int, batches=None) -> StepStats:
    cfg, layout, opt, scaler = state.cfg, state.layout, state.optimizer, state.scaler
    if cfg.engine == "accelerate":
        from llmopt import accelerate_engine

        return accelerate_engine.train_step(state, step, batches)
    batches = micro_batches(state, step) if batches is None else batches
    opt.zero_grad(set_to_none=True)
    small = []  # --gns: the squared norm of the first micro-batch's gradient, taken before the next adds to it
    probe = (lambda: small.append(layout.grad_sq_norm() * len(batches) ** 2)) if state.noise_scale else None
    local_loss = layout.forward_backward(batches, autocast(cfg.precision, state.device.type), scaler, probe)
    layout.finish_grads()
    if scaler is not None:
        scaler.unscale_(opt)  # the inf check is global: see llmopt.precision.GradScaler
    grad_norm = layout.grad_norm()
    if state.noise_scale is not None:
        state.noise_scale.update(layout.dp_mean(small[0]), grad_norm**2)
    if cfg.max_grad_norm > 0:
        clip_grads_(layout.parameters(), grad_norm, cfg.max_grad_norm)
    skipped = False
    if scaler is not None:
        scale_before = scaler.get_scale()  # host sync, fp16 only: the skip count is a reported figure
        scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < scale_before
    else:
        opt.step()
    if state.scheduler is not None:
        state.scheduler.step()
    return StepStats(layout.global_loss(local_loss), grad_norm, cfg.global_batch * cfg.seq_len, skipped)
