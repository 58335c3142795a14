"""What every engine shares: the state a step works on, the stats it returns, the batches it reads, and the
two-call protocol (``build``, ``step``) that llmopt's own step (``llmopt.engines.native.NativeEngine``) and the
Accelerate peer (``llmopt.engines.accelerate.AccelerateEngine``) implement. ``llmopt.step`` picks one per
config, once, in ``build``; nothing else asks which engine runs. Neither engine module imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from llmopt.data import shard_rows
from llmopt.instruments import Stopwatch

if TYPE_CHECKING:
    from llmopt.core.config import TrainConfig
    from llmopt.instruments import NoiseScale


@dataclass
class StepStats:
    loss: torch.Tensor        # global-batch mean loss, a 0-dim tensor (same value on every rank)
    grad_norm: torch.Tensor   # global gradient norm before clipping
    tokens: int               # tokens in the global batch
    fp16_skipped: bool        # fp16: the scaler found inf/NaN gradients and skipped the update
    optimizer_time: Stopwatch | None = None  # the optimizer's update alone; read its ms() after the step's sync


class Layout(Protocol):
    """What the code every engine shares (the run loop, evals, ``--save``, the metrics) asks of a layout:
    ``llmopt.distributed.parallelize.Layout`` (llmopt's step; it adds what the native step needs: forward and
    backward over micro-batches, the gradient norm) and ``llmopt.engines.accelerate.AccelerateLayout``."""

    model: torch.nn.Module    # what is trained (wrapped for the layout)
    module: torch.nn.Module   # the unwrapped model
    coord: dict               # this rank's coordinate per mesh dimension: {"pp": i, "dp": j, "tp": k}

    def parameters(self): ...

    def eval_loss(self, micro_batches, amp) -> torch.Tensor: ...

    def global_loss(self, local: torch.Tensor) -> torch.Tensor: ...

    def gather_object(self, local) -> list: ...


@dataclass
class TrainState:
    cfg: TrainConfig
    device: torch.device
    layout: Layout
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    source: object            # llmopt.data: MarkovSource, TextFileSource or PreparedSource
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    noise_scale: NoiseScale | None = None  # --gns: running estimate of the gradient noise scale
    engine: Engine | None = None           # the engine that built this state; steps it
    # The next step's micro-batches, built while the device runs this step's kernels (CUDA: the host is
    # otherwise idle until the loss is read; on CPU the work is the same either way, so it is off there).
    prefetch: bool = False
    prefetched: dict[int, list] = field(default_factory=dict)
    accelerator: object | None = None      # the Accelerate peer's accelerate.Accelerator (None for llmopt's step)

    @property
    def model(self):
        return self.layout.model


class Engine(Protocol):
    def build(self, cfg: TrainConfig, device: torch.device) -> TrainState: ...

    def step(self, state: TrainState, step: int, batches=None) -> StepStats: ...


def step_batches(state: TrainState, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches of ``step``: prefetched by the previous step when ``state.prefetch``, else built now."""
    batches = state.prefetched.pop(step, None)
    state.prefetched.clear()  # a batch for another step (a run that jumped) is never used
    return micro_batches(state, step) if batches is None else batches


def prefetch_next(state: TrainState, step: int) -> None:
    if state.prefetch:
        state.prefetched[step + 1] = micro_batches(state, step + 1)


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
