"""Data parallelism: DDP (Li et al. 2020) or FSDP2's fully_shard (Zhao et al. 2023), over the "dp" mesh."""
from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, blocks) -> nn.Module:
    """fully_shard each transformer block, then the root (embeddings, final LayerNorm, head).

    Parameters stay fp32 (autocast casts inside the step), so FSDP's mixed-precision policy is left off.
    """
    mp = MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    return model


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, device) -> nn.Module:
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), device_ids=device_ids)


def grad_sync(model: nn.Module, last_micro_batch: bool):
    """Sync gradients on the last accumulation micro-batch only: DDP's no_sync, FSDP2's
    set_requires_gradient_sync; a context manager that wraps that micro-batch's forward and backward."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if last_micro_batch else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule
        model.set_requires_gradient_sync(last_micro_batch)
    return contextlib.nullcontext()
