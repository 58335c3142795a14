"""Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", section 3) with DTensor's parallelize_module.

Each block's attention and MLP are split the Megatron way: the first projection column-wise (each rank holds
whole heads / a slice of the 4C hidden units, its ``f`` operator is an identity forward and an all-reduce
backward), the second row-wise (its ``g`` operator all-reduces the partial outputs forward). Embeddings,
LayerNorms and the tied head stay replicated: on the presets they are a small share of the FLOPs, and a
replicated head keeps the loss a plain tensor on every rank.

Replicated is still DTensor (torchtitan's ``NoParallel``): those parameters become DTensors with a
``Replicate`` placement on the TP mesh, so every parameter of the model is one kind of tensor on one mesh
and gradient norms, clipping and loss scaling are torch's own (``get_total_norm``,
``clip_grads_with_norm_``, ``ShardedGradScaler``) with one reduction per mesh dimension, no per-tensor
collective and no private API. Their modules take
plain tensors in and hand plain tensors out (the residual stream between blocks stays plain, as before), and
their gradients need no collective: every TP rank computes the same one, because the column-wise ``f``
operator has already all-reduced the gradient flowing into them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
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
        for norm in (block.ln_1, block.ln_2):
            apply_no_parallel(norm, tp_mesh)
    for name in ("wte", "wpe", "ln_f"):  # a pipeline stage holds some of these (None where it does not)
        if getattr(model, name) is not None:
            apply_no_parallel(getattr(model, name), tp_mesh)
    if getattr(model, "lm_head", None) is not None:  # a last pipeline stage's copy of the tied head: never
        distribute_module(model.lm_head, tp_mesh, _replicate_params)  # called, only its weight is read
    # The tied head itself runs on the local copy of its replicated weight: llmopt.model.local_tensor.


def apply_no_parallel(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Replicated parameters as DTensors on ``tp_mesh``; plain tensors in and out."""
    distribute_module(module, tp_mesh, _replicate_params, input_fn=_replicated_inputs, output_fn=_local_output)


def _replicate_params(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    # from_local, not distribute_tensor: every rank built the same weights from the same seed, so nothing
    # needs broadcasting (distribute_tensor's Replicate would broadcast each tensor from the first rank)
    for key, p in list(module.named_parameters(recurse=False)):
        module.register_parameter(key, nn.Parameter(DTensor.from_local(p.data, mesh, [Replicate()], run_check=False),
                                                    requires_grad=p.requires_grad))


def _replicated_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) if isinstance(x, torch.Tensor)
                 and not isinstance(x, DTensor) else x for x in inputs)


def _local_output(module: nn.Module, output: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return output.to_local()
