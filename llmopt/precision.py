"""Mixed precision from the config: an autocast context and, for fp16, a GradScaler."""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def check_precision(precision: str, device: str) -> None:
    """Refuse up front a precision the device cannot run (ValueError naming the flag and the fix)."""
    if precision == "fp32":
        return
    if device == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name()} has no bf16 support; "
                             "use --precision fp16 or fp32")
        return
    # CPU: run one tiny autocast matmul and its backward; a build without the kernels fails here.
    try:
        a = torch.randn(4, 4, requires_grad=True)
        with torch.autocast("cpu", dtype=DTYPES[precision]):
            (a @ a).float().sum().backward()
    except RuntimeError as e:
        raise ValueError(f"--precision {precision}: not supported on this CPU ({e}); use --precision fp32") from None


def autocast(precision: str, device: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=DTYPES[precision])


def sharded_scaler(precision: str, world_size: int) -> bool:
    """Whether the step's loss scaler is torch's ``ShardedGradScaler`` (see ``grad_scaler``)."""
    return precision == "fp16" and world_size > 1


def fused_optimizer_ok(precision: str, world_size: int) -> bool:
    """Whether torch's fused optimizer kernels can run under this step's loss scaler. ``ShardedGradScaler``
    hands the optimizer a found-inf flag of shape (1,), which the fused Adam kernels refuse (they need the
    shape () of their step counters: pytorch/pytorch#140514, still so in torch 2.13), so under it the
    optimizer takes torch's foreach kernels."""
    return not sharded_scaler(precision, world_size)


def grad_scaler(precision: str, device: str, world_size: int) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (Micikevicius et al. 2018); bf16 has fp32's exponent range and does not.

    torch's own scalers: with several ranks ``ShardedGradScaler``, which unscales DTensor gradients (FSDP2 and
    TP shards, TP's replicated parameters) on their local shards and all-reduces the inf/NaN finding over the
    world, so every rank skips the same steps (a shard or a pipeline stage can overflow where others do not, and
    replicas must never drift apart); in one process ``torch.amp.GradScaler``. The scale is created at once on
    every rank by scaling a scalar: pipeline stages before the last never scale a loss (their gradients arrive
    already scaled), yet they unscale and update."""
    if precision != "fp16":
        return None
    if sharded_scaler(precision, world_size):
        # imported here: it brings in torch.distributed.fsdp and DTensor, a large share of the start-up of the
        # commands that import this module through the config and never train (tests/test_structure.py)
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device)
    else:
        scaler = torch.amp.GradScaler(device)
    on = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    scaler.scale(torch.ones((), device=on))
    return scaler
