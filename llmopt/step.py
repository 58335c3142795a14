"""THE training step, used by the CLI, the harness and the benchmarks alike.

``build(cfg, device)`` makes everything a step needs (the layout-wrapped model, optimizer, precision, data);
``train_step(state, step)`` runs one optimizer step on the global batch of ``step`` and returns the loss as a
tensor with its stats, without synchronising the host: the caller decides when to read numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from llmopt.data import build_source, shard
from llmopt.distributed.parallelize import Layout, parallelize
from llmopt.optim import build_optimizer
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
    source = build_source(cfg.data, cfg.model_config.vocab_size, cfg.seed)
    return TrainState(cfg, device, layout, optimizer, grad_scaler(cfg.precision, device.type), source)


def micro_batches(state: TrainState, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's accumulation micro-batches: its data-parallel slice of the global batch of ``step``,
    split ``grad_accum`` ways. The global batch depends on (seed, step) alone."""
    cfg = state.cfg
    x, y = state.source.batch(step, cfg.global_batch, cfg.seq_len)
    dp_rank = state.layout.coord["dp"]
    x, y = shard(x, dp_rank, cfg.dp), shard(y, dp_rank, cfg.dp)
    nb = state.device.type == "cuda"
    return [(shard(x, i, cfg.grad_accum).to(state.device, non_blocking=nb),
             shard(y, i, cfg.grad_accum).to(state.device, non_blocking=nb)) for i in range(cfg.grad_accum)]


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
    local_loss = layout.forward_backward(batches, autocast(cfg.precision, state.device.type), scaler)
    layout.finish_grads()
    if scaler is not None:
        scaler.unscale_(opt)  # the inf check is global: see llmopt.precision.GradScaler
    grad_norm = layout.grad_norm()
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
    return StepStats(layout.global_loss(local_loss), grad_norm, cfg.global_batch * cfg.seq_len, skipped)
