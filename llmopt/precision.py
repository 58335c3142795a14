"""Mixed precision from the config: an autocast context and, for fp16, a GradScaler."""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

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


class GradScaler(torch.amp.GradScaler):
    """torch's GradScaler, made correct for sharded layouts, as torch's own ShardedGradScaler does for FSDP1:

    * gradients are unscaled on their local shards, so DTensor (TP, FSDP2) and plain gradients can share one
      optimizer;
    * the inf/NaN finding is all-reduced over the whole world, so every rank skips the same steps (a shard or
      a pipeline stage can overflow where others do not, and replicas must never drift apart);
    * the scale exists from the start, on ranks that never call ``scale`` (early pipeline stages, whose
      gradients arrive already scaled from the last stage's loss).
    """

    def __init__(self, device: str, **kw):
        super().__init__(device, **kw)
        if self._enabled:
            self._lazy_init_scale_growth_tracker(torch.device(device, torch.cuda.current_device())
                                                 if device == "cuda" else torch.device(device))

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        by_device: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                if not allow_fp16 and g.dtype == torch.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")
                by_device[(g.device, g.dtype)].append(g)
        found = {}
        with torch.no_grad():
            for (device, _), grads in by_device.items():
                f = found.setdefault(device, found_inf.to(device))
                # the same private kernel torch's own GradScaler and ShardedGradScaler call; kept because
                # neither unscales a list that mixes DTensor and plain gradients (TP's replicated parameters)
                # nor, for GradScaler, agrees on the inf across ranks. Pinned by tests/test_toggles.py
                # (an inf on one rank: every rank skips, the scale halves) and tests/test_step.py.
                torch._amp_foreach_non_finite_check_and_unscale_(grads, f, inv_scale.to(device))
            if not found:
                found[found_inf.device] = found_inf
            if dist.is_initialized():
                for f in found.values():
                    dist.all_reduce(f, op=dist.ReduceOp.MAX)
        return found


def grad_scaler(precision: str, device: str) -> GradScaler | None:
    """fp16 needs loss scaling (Micikevicius et al. 2018); bf16 has fp32's exponent range and does not."""
    return GradScaler(device) if precision == "fp16" else None
