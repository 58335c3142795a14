"""Data parallelism over the "dp" mesh: DDP (Li et al. 2020, "PyTorch Distributed") or FSDP2's fully_shard
(Zhao et al. 2023, "PyTorch FSDP"; FSDP2 shards each parameter as a DTensor on dim 0).

``ddp`` alone is ``DistributedDataParallel``. Composed with tensor or pipeline parallelism it is torch's
composable ``replicate`` (the same DDP semantics: full replicas, gradients all-reduced and averaged, built on
FSDP2's DTensor-aware machinery), because in torch 2.13 ``DistributedDataParallel`` composes with neither:
over a DTensor module its bridge (``_pre_dp_module_transform``) swaps the parameter objects after every
forward, so the optimizer stops seeing the trained weights (the loss drifts from step 2), and under a
pipeline stage its reducer fails on the second step ("rebuilt parameter indices size is not same").
"""
from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.distributed._composable.replicate_with_fsdp import replicate  # private module: see the docstring;

# its behaviour (DDP semantics under TP and PP) is pinned by tests/test_parity.py's dp2xtp2 and dp2xpp2 cases
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, blocks) -> nn.Module:
    """fully_shard each transformer block, then the root (embeddings, final LayerNorm, head). Parameters
    stay fp32 (autocast casts inside the step), so FSDP's mixed-precision policy is left at its default."""
    for block in blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


def apply_replicate(model: nn.Module, dp_mesh: DeviceMesh, blocks) -> nn.Module:
    """DDP semantics for a TP- or PP-parallelised module, per block then the root (see module docstring)."""
    for block in blocks:
        replicate(block, mesh=dp_mesh)
    replicate(model, mesh=dp_mesh)
    return model


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, device) -> nn.Module:
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(), device_ids=device_ids)


def grad_sync(model: nn.Module, last_micro_batch: bool):
    """Sync gradients on the last accumulation micro-batch only: DDP's no_sync, FSDP2's (and replicate's)
    set_requires_gradient_sync. A context manager around that micro-batch's forward and backward."""
    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if last_micro_batch else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule / ReplicateModule
        model.set_requires_gradient_sync(last_micro_batch)
    return contextlib.nullcontext()
