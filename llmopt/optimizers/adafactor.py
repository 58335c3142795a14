"""Adafactor (Shazeer & Stern 2018): torch's ``torch.optim.Adafactor`` with torch's defaults: factored second
moments (a row and a column statistic per matrix), no first moment, a step relative to the parameter's RMS
that --lr caps. Under FSDP2/TP each tensor and its gradient are gathered whole (``llmopt.optim.WholeTensors``),
so the statistics are the whole tensor's, kept on every rank."""
from llmopt.optimizers import OptimizerSpec, Stage, all_tensors, largest


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    import torch

    from llmopt.optim import param_groups, whole_tensor_optimizer

    kw = {} if impl == "auto" else {"foreach": impl == "foreach"}
    return whole_tensor_optimizer(torch.optim.Adafactor, param_groups(model, weight_decay), lr=lr, **kw)


def state_bytes(stage: Stage) -> int:
    """Per matrix a row and a column statistic, per vector a full second moment, of the whole tensor on every
    rank, and a step count per tensor."""
    return 4 * sum((sum(s) if len(s) == 2 else s[0]) + 1 for s in stage.tensors)


def transient_bytes(stage: Stage) -> int:
    """Under FSDP2/TP the largest tensor and its gradient, gathered whole (buckets of that size)."""
    return 2 * 4 * largest(stage.tensors) if stage.shards > 1 else 0


SPEC = OptimizerSpec(
    name="adafactor", about="Adafactor, factored second moments (torch.optim.Adafactor)", build=build,
    default_lr=1e-2, lr_centre=1e-1, impls=("for-loop", "foreach"), state_bytes=state_bytes,
    transient_bytes=transient_bytes, gathers=all_tensors, gathered_per_tensor=2, order=60)
