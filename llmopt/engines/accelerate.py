"""A peer to measure against: the same model and data trained through Hugging Face Accelerate, written the
way its documentation teaches (``Accelerator`` owning mixed precision, gradient accumulation and DDP).

``AccelerateEngine`` implements ``llmopt.engines.Engine`` (build, step) like llmopt's own step, so the CLI, the
harness and the benchmarks treat both alike; nothing here is llmopt's own machinery except the data slicing,
so that both see the same tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from llmopt.core.config import TrainConfig
from llmopt.data import build_source
from llmopt.distributed.parallelize import build_model, gather_object
from llmopt.distributed.speed import apply_speed_toggles
from llmopt.engines import StepStats, TrainState, micro_batches
from llmopt.instruments import Stopwatch
from llmopt.optim import build_optimizer, build_scheduler

MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class AccelerateLayout:
    """``llmopt.engines.Layout`` over Accelerate's prepared model: what the shared code needs (rank coordinates,
    evals, the global loss, gathering metrics), nothing of the native step's."""

    def __init__(self, accelerator, model):
        self.accelerator, self.model = accelerator, model
        self.module = accelerator.unwrap_model(model)
        self.coord = {"pp": 0, "dp": accelerator.process_index, "tp": 0}

    def parameters(self):
        return self.model.parameters()

    def gather_object(self, local) -> list:
        return gather_object(local)

    def eval_loss(self, micro_batches, amp) -> torch.Tensor:
        """Forward only; Accelerate's prepared model applies its own autocast, so ``amp`` is not used."""
        total = torch.zeros((), device=self.accelerator.device)
        for x, y in micro_batches:
            total += self.model(x, y).float() / len(micro_batches)
        return total

    def global_loss(self, local: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized():
            return local
        local = local.clone()
        dist.all_reduce(local)  # gloo has no AVG
        return local / dist.get_world_size()


class AccelerateEngine:
    def build(self, cfg, device: torch.device) -> TrainState:
        return build(cfg, device)

    def step(self, state: TrainState, step: int, batches=None) -> StepStats:
        return train_step(state, step, batches)


def build(cfg: TrainConfig, device: torch.device) -> TrainState:
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=MIXED[cfg.precision], gradient_accumulation_steps=cfg.grad_accum,
                      cpu=device.type == "cpu")
    model = build_model(cfg)
    if cfg.model_impl == "hf":
        model.labels_style = True  # model(input_ids=ids, labels=ids).loss, as Accelerate's users write it
    apply_speed_toggles(model, cfg)
    # "auto" means what Accelerate's users get: torch's default kernels (foreach on CUDA, for-loop on CPU)
    impl = cfg.optimizer_impl if cfg.optimizer_impl != "auto" else ("foreach" if device.type == "cuda" else "for-loop")
    optimizer = build_optimizer(cfg.optimizer, model, cfg.lr, cfg.weight_decay, impl, adamw_lr=cfg.adamw_lr)
    scheduler = build_scheduler(optimizer, cfg)  # on torch's optimizer: stepped once per step, not per micro-batch
    model, optimizer = acc.prepare(model, optimizer)
    state = TrainState(cfg, acc.device, AccelerateLayout(acc, model), optimizer, None,
                       build_source(cfg.data, cfg.model_config.vocab_size, cfg.seed, cfg.tokenizer), scheduler)
    state.accelerator = acc
    return state


def train_step(state: TrainState, step: int, batches=None) -> StepStats:
    cfg, acc, model, opt = state.cfg, state.accelerator, state.layout.model, state.optimizer
    batches = micro_batches(state, step) if batches is None else batches
    total = torch.zeros((), device=acc.device)
    grad_norm = torch.zeros((), device=acc.device)
    update = Stopwatch(acc.device)
    for x, y in batches:
        with acc.accumulate(model):  # no DDP sync, no optimizer step until the last micro-batch
            loss = model(x, y)
            acc.backward(loss)  # divides by gradient_accumulation_steps itself
            if acc.sync_gradients:
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                with update:  # the micro-batches before the last have no update to time (Accelerate skips it)
                    opt.step()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        total += loss.detach() / len(batches)
    state.scheduler.step()
    return StepStats(state.layout.global_loss(total), torch.as_tensor(grad_norm, dtype=torch.float32),
                     cfg.global_batch * cfg.seq_len, bool(acc.optimizer_step_was_skipped), update)
