"""Pipeline parallelism with torch.distributed.pipelining: GPipe (Huang et al. 2019) and 1F1B
(Narayanan et al. 2019, PipeDream-Flush: warm-up forwards, a steady phase alternating one forward and one
backward, then the cool-down backwards, so at most ``pp`` micro-batches' activations are alive at once).

A stage is the model itself with the blocks of other stages deleted (``split_stage``). The first stage keeps
the embeddings, the last keeps the final LayerNorm and the output head. The head is tied to the token
embedding, which lives on the first stage, so the last stage holds a copy (``lm_head``) and the two
gradients are summed after backward (``TiedHead.sync_grads``): both copies then take the same update.

The loss is the same fused linear + cross-entropy as without a pipeline (no (B, T, vocab) logits): the last
stage's rank hands the targets to its schedule as a keyword argument, which the schedule splits into chunks
and passes to that stage's forward beside the hidden states it receives, so the last stage's forward returns
the chunk's loss and the schedule's ``loss_fn`` only scales it. (Sending the targets down the pipeline beside
the hidden states instead fails on torch 2.11, whose stages send a gradient back for every received tensor.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor

from llmopt.core.shapes import stage_layers

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def split_stage(model: nn.Module, stage: int, n_stages: int) -> nn.Module:
    """Turn the full GPT into pipeline stage ``stage`` of ``n_stages``, in place."""
    keep = {str(i) for i in stage_layers(model.config.n_layer, n_stages, stage)}
    for name in list(model.h.keys()):
        if name not in keep:
            del model.h[name]
    last = stage == n_stages - 1
    if last and stage > 0:
        model.lm_head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
        with torch.no_grad():
            model.lm_head.weight.copy_(model.wte.weight)
    if stage > 0:
        model.wte = None
        model.wpe = None
    if not last:
        model.ln_f = None
    return model


class TiedHead:
    """Sums the gradient of the token embedding (first stage) and its head copy (last stage)."""

    def __init__(self, mesh: DeviceMesh, stage: int, n_stages: int, model: nn.Module):
        self.group = None
        self.param = None
        ranks = mesh.mesh  # (pp, dp, tp) tensor of global ranks
        me = dist.get_rank()
        # new_group is collective over the whole world: every rank creates every pair, in the same order.
        for pair in torch.stack([ranks[0], ranks[-1]], dim=-1).reshape(-1, 2).tolist():
            group = dist.new_group(pair)
            if me in pair:
                self.group = group
        if stage == 0:
            self.param = model.wte.weight
        elif stage == n_stages - 1:
            self.param = model.lm_head.weight

    def sync_grads(self) -> None:
        if self.param is None:  # a middle stage holds neither copy
            return
        g = self.param.grad
        dist.all_reduce(g.to_local() if isinstance(g, DTensor) else g, group=self.group)


class Pipeline:
    """Runs one rank's part of the forward and backward of a step through a pipelining schedule."""

    def __init__(self, module: nn.Module, unwrapped: nn.Module, stage: int, n_stages: int, schedule: str,
                 n_chunks: int, grad_accum: int, mesh: DeviceMesh, device: torch.device):
        self.n_stages = n_stages
        self.first, self.last = stage == 0, stage == n_stages - 1
        group = mesh["pp"].get_group()
        self.stage = PipelineStage(module, stage, n_stages, device, group=group)
        # The loss of one chunk is its token mean over (chunks x accumulation micro-batches), so gradients add
        # up to the global-batch mean; torch's own rescaling (scale_grads) would also rescale gradients kept
        # from earlier accumulation micro-batches, so it is off.
        self.n_chunks = n_chunks
        self.loss_divisor = n_chunks * grad_accum
        self.scaler = None
        self._chunk_losses: list[torch.Tensor] = []
        self.schedule = SCHEDULES[schedule](self.stage, n_chunks, loss_fn=self._loss_fn, scale_grads=False)
        # Evals run through a stage of their own: a stage set up by a forward-only first call (an eval before
        # the first step) has receive buffers that never require grad, and on torch 2.11 its later training
        # backward then fails. Forward only, so GPipe whatever the training schedule.
        self.eval_schedule = ScheduleGPipe(PipelineStage(module, stage, n_stages, device, group=group), n_chunks,
                                           loss_fn=self._loss_fn, scale_grads=False)
        self.tied = TiedHead(mesh, stage, n_stages, unwrapped)

    def _loss_fn(self, chunk_loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The last stage's output already is the chunk's mean loss: the model's fused head computed it from
        the targets the stages handed on (``GPT.forward``), as it does without a pipeline."""
        loss = chunk_loss / self.loss_divisor
        self._chunk_losses.append(loss.detach())
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def forward_backward(self, micro_batches, amp, scaler, after_first=None) -> torch.Tensor:
        """Returns this rank's share of the step's mean loss (non-zero on the last stage only)."""
        self.scaler = scaler
        total = torch.zeros((), device=self.stage.device)
        for i, (x, y) in enumerate(micro_batches):
            total += self._run(self.schedule.step, x, y, amp)
            if i == 0 and after_first is not None:
                after_first()
        return total

    def eval_loss(self, micro_batches, amp) -> torch.Tensor:
        """Forward only (the schedule's ``eval``): this rank's share of the mean loss, as in training."""
        self.scaler = None
        total = torch.zeros((), device=self.stage.device)
        for x, y in micro_batches:
            total += self._run(self.eval_schedule.eval, x, y, amp)
        return total * (self.loss_divisor / (self.n_chunks * len(micro_batches)))

    def _run(self, run, x, y, amp) -> torch.Tensor:
        self._chunk_losses.clear()
        with amp:
            # return_outputs=False: the last stage would otherwise keep every chunk's logits to merge them
            # x and y are views of one (B, T + 1) buffer: made whole (torch 2.11's schedules check strides)
            if self.first:
                run(x.contiguous(), return_outputs=False)
            elif self.last:  # kwargs reach the stage's own forward, split into chunks as the args are
                run(targets=y.contiguous(), target=y, return_outputs=False)
            else:
                run(return_outputs=False)
        if not self.last:
            return torch.zeros((), device=self.stage.device)
        # The first step also calls the loss once while inferring shapes: keep the chunks' own.
        return torch.stack(self._chunk_losses[-self.n_chunks:]).sum().float()

    def finish_grads(self) -> None:
        self.tied.sync_grads()

    def excluded_from_norm(self) -> set:
        """The head copy on the last stage duplicates the embedding's gradient: count it once."""
        return {self.tied.param} if self.last and self.n_stages > 1 else set()
