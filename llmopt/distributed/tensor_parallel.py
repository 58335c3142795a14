"""Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", section 3) with DTensor's parallelize_module.

Each block's attention and MLP are split the Megatron way: the first projection column-wise (each rank holds
whole heads / a slice of the 4C hidden units, its ``f`` operator is an identity forward and an all-reduce
backward), the second row-wise (its ``g`` operator all-reduces the partial outputs forward). Embeddings,
LayerNorms and the tied head stay replicated: on the presets they are a small share of the FLOPs, and a
replicated head keeps the loss a plain tensor on every rank.
"""
from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

# The plan for one block; keys are module paths inside llmopt.model.Block.
BLOCK_PLAN = {
    "attn.c_attn": ColwiseParallel(),  # QKV grouped by head: a column shard is a set of whole heads
    "attn.c_proj": RowwiseParallel(),
    "mlp.c_fc": ColwiseParallel(),
    "mlp.c_proj": RowwiseParallel(),
}


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    for block in model.h.values():
        parallelize_module(block, tp_mesh, BLOCK_PLAN)
