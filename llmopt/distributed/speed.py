"""Per-block speed toggles, applied between tensor parallelism and data parallelism (torchtitan's order:
TP -> activation checkpointing -> compile -> FSDP/DDP), so each wrapper sees the block it expects."""
from __future__ import annotations

import torch.nn as nn

# A private module path, as torchtitan uses it: torch's distributed state-dict API (``--save``) strips this
# wrapper's parameter prefix and FSDP2 wraps it per block; a wrapper of our own around the public
# torch.utils.checkpoint would need both taught. Pinned by tests/test_toggles.py (checkpointing = eager
# losses) and tests/test_workflow.py's save round trips.
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_ac(blocks: nn.ModuleDict | nn.ModuleList) -> None:
    """Activation checkpointing per block (Chen et al. 2016): keep only each block's input, recompute the
    rest in backward. Trades about one extra forward for most of the activation memory."""
    for k, block in _items(blocks):
        blocks[k] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(blocks: nn.ModuleDict | nn.ModuleList) -> None:
    """torch.compile each block in place (the blocks are identical, so one compiled graph serves all)."""
    for _, block in _items(blocks):
        block.compile()


def _items(blocks: nn.ModuleDict | nn.ModuleList) -> list[tuple]:
    """(key, block) pairs of llmopt's ModuleDict (keyed by layer index) or HF's ModuleList."""
    return list(blocks.items()) if isinstance(blocks, nn.ModuleDict) else list(enumerate(blocks))


def blocks_of(model: nn.Module) -> nn.ModuleDict | nn.ModuleList:
    """The container of transformer blocks: llmopt's ``h`` (a ModuleDict) or HF's ``transformer.h``."""
    return model.h if hasattr(model, "h") else model.hf.transformer.h


def apply_speed_toggles(model: nn.Module, cfg) -> list[nn.Module]:
    """Activation checkpointing, then compile, per block as the config asks; returns the blocks."""
    container = blocks_of(model)
    if cfg.activation_checkpointing:
        apply_ac(container)
    if cfg.compile:
        apply_compile(container)
    return [block for _, block in _items(container)]
