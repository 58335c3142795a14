"""Build the model for this rank and wrap it for the layout, in one fixed order:

    full model (same seed on every rank) -> pipeline split -> tensor parallel -> data parallel (FSDP2 / DDP)

The result is a ``Layout``: the module to optimise plus the few operations the training step needs whose
meaning depends on the layout (run forward+backward over the micro-batches, finish gradients, the global
gradient norm, the global-batch loss). The step calls these and never asks which layout it is under.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from llmopt.core.config import TrainConfig
from llmopt.distributed.data_parallel import apply_ddp, apply_fsdp, apply_replicate, grad_sync
from llmopt.distributed.dims import ParallelDims
from llmopt.distributed.pipeline import Pipeline, split_stage
from llmopt.distributed.speed import apply_speed_toggles
from llmopt.distributed.tensor_parallel import apply_tp
from llmopt.model import GPT


class HFCausalLM(nn.Module):
    """transformers' GPT2LMHeadModel behind llmopt's ``model(idx, targets) -> loss`` interface.

    By default the loss is taken on the logits (the data source already shifted the targets). With
    ``labels_style`` HF computes it, the way its users get it, through ``labels=`` and its own loss function
    (which upcasts the logits); ``shift_labels`` hands it the already shifted targets, so exactly the same
    T tokens are predicted as in llmopt's loss."""

    def __init__(self, hf_model: nn.Module, labels_style: bool = False):
        super().__init__()
        self.hf = hf_model
        self.labels_style = labels_style

    def forward(self, idx, targets=None):
        if targets is not None and self.labels_style:
            return self.hf(input_ids=idx, labels=targets, shift_labels=targets.contiguous()).loss
        logits = self.hf(input_ids=idx).logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build_model(cfg: TrainConfig) -> nn.Module:
    """The full single-device model, initialised from ``cfg.seed`` alone (identical on every rank), or from
    ``--init hf:...`` weights. The HF model gets llmopt's initial weights (``to_hf``), so the two
    implementations start from the same point and their loss curves can be compared step by step."""
    torch.manual_seed(cfg.seed)
    if cfg.init is not None:
        hf = load_pretrained(cfg.init)
        return HFCausalLM(hf) if cfg.model_impl == "hf" else GPT.from_hf(hf)
    model = GPT(cfg.model_config)
    return HFCausalLM(model.to_hf()) if cfg.model_impl == "hf" else model


def load_pretrained(init: str) -> nn.Module:
    """``hf:NAME_OR_PATH`` loaded and checked by ``llmopt.checkpoint.load_gpt2``; ``ckpt:DIR`` is the model
    ``llmopt.export`` wrote from that checkpoint before the ranks started (``exported_for_init``)."""
    from llmopt.checkpoint import exported_for_init, load_gpt2
    from llmopt.core.config import init_path

    path = exported_for_init(init) if init.startswith("ckpt:") else init_path(init)
    return load_gpt2(path, f"--init {init}")


class Layout:
    """llmopt's layout: the model built, split and wrapped for this rank (see the module docstring); it offers
    the shared code ``llmopt.engines.Layout`` and the native step its layout-dependent operations."""

    def __init__(self, cfg, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device):
        self.dims, self.mesh, self.device = dims, mesh, device
        model = build_model(cfg)
        self.pipeline = None
        coord = {n: (mesh.get_local_rank(n) if mesh is not None else 0) for n in ("pp", "dp", "tp")}
        self.coord = coord
        if dims.pp_enabled:
            model = split_stage(model, coord["pp"], dims.pp)
        model.to(device)
        if dims.tp_enabled:
            apply_tp(model, mesh["tp"])
        blocks = apply_speed_toggles(model, cfg)
        self.module = model  # unwrapped (DDP alone wraps; fully_shard and replicate work in place)
        if dims.fsdp_enabled:
            apply_fsdp(model, mesh["dp"], blocks)
        elif dims.ddp_enabled and (dims.tp_enabled or dims.pp_enabled):
            apply_replicate(model, mesh["dp"], blocks)
        elif dims.ddp_enabled:
            model = apply_ddp(model, mesh["dp"], device)
        self.model = model
        if dims.pp_enabled:
            self.pipeline = Pipeline(model, self.module, coord["pp"], dims.pp, cfg.pp_schedule,
                                     cfg.pp_microbatches, cfg.grad_accum, mesh, device)
        # Ranks whose loss is the global batch's: one per data-parallel replica (last stage, TP rank 0).
        self.loss_owner = coord["pp"] == dims.pp - 1 and coord["tp"] == 0

    def parameters(self):
        return self.model.parameters()

    # ------------------------------------------------------------------ the step's layout-dependent parts
    def forward_backward(self, micro_batches, amp, scaler, after_first=None) -> torch.Tensor:
        """Forward and backward over the accumulation micro-batches; returns this rank's mean loss (detached).
        ``after_first`` (if given) is called once the first micro-batch's gradient is in ``.grad``."""
        if self.pipeline is not None:
            return self.pipeline.forward_backward(micro_batches, amp, scaler, after_first)
        k = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            with grad_sync(self.model, last_micro_batch=i == k - 1):
                with amp:
                    loss = self.model(x, y) / k
                (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.detach()
            if i == 0 and after_first is not None:
                after_first()
        return total

    def eval_loss(self, micro_batches, amp) -> torch.Tensor:
        """This rank's mean loss over the micro-batches, forward only (call under ``torch.no_grad``)."""
        if self.pipeline is not None:
            return self.pipeline.eval_loss(micro_batches, amp)
        total = torch.zeros((), device=self.device)
        for x, y in micro_batches:
            with amp:
                total += self.model(x, y).float() / len(micro_batches)
        return total

    def finish_grads(self) -> None:
        if self.pipeline is not None:
            self.pipeline.finish_grads()

    def grad_sq_norm(self) -> torch.Tensor:
        """The squared 2-norm of this replica's gradient: torch's ``get_total_norm``, pipeline stages summed,
        the tied head counted once. Every layout's gradients are one kind of tensor on one mesh (plain under
        DDP and PP, DTensors under FSDP2 and TP, replicated TP parameters included), so this is one reduction
        per mesh dimension, not one per tensor."""
        skip = self.pipeline.excluded_from_norm() if self.pipeline is not None else set()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None and p not in skip]
        n = torch.nn.utils.get_total_norm(grads, 2.0)
        sq = (n.full_tensor() if isinstance(n, DTensor) else n).float() ** 2
        if self.pipeline is not None:
            dist.all_reduce(sq, group=self.mesh["pp"].get_group())
        return sq

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of the whole model's gradient (after the data-parallel reduction)."""
        return self.grad_sq_norm().sqrt()

    def dp_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a per-replica value over the data-parallel ranks."""
        if self.dims.dp == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.mesh["dp"].get_group())
        return t / self.dims.dp

    def global_loss(self, local: torch.Tensor) -> torch.Tensor:
        """The global-batch mean loss, on every rank."""
        if not dist.is_initialized():
            return local
        share = local / self.dims.dp if self.loss_owner else torch.zeros_like(local)
        dist.all_reduce(share)
        return share

    def gather_object(self, local) -> list:
        return gather_object(local)


def gather_object(local) -> list:
    """Every rank's ``local`` (a picklable object), in rank order; ``[local]`` in a single process."""
    if not dist.is_initialized():
        return [local]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def parallelize(cfg: TrainConfig, device: torch.device) -> Layout:
    dims = ParallelDims.from_config(cfg)
    mesh = dims.build_mesh(device.type)
    return Layout(cfg, dims, mesh, device)
