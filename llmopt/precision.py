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


def grad_scaler(precision: str, device: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (Micikevicius et al. 2018); bf16 has fp32's exponent range and does not."""
    return torch.amp.GradScaler(device) if precision == "fp16" else None
