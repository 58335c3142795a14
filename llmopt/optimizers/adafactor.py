"""Adafactor (Shazeer & Stern 2018): torch's ``torch.optim.Adafactor`` with torch's defaults: factored second
moments (a row and a column statistic per matrix), no first moment, a step relative to the parameter's RMS
that --lr caps. Under FSDP2 or TP alone (a 1-D mesh) it is computed from the shards
(``llmopt.optim.ShardedAdafactor``: two all-reduces of sums per step); on a 2-D mesh (FSDP2 over TP's
strided shards) each tensor and its gradient are gathered whole (``llmopt.optim.WholeTensors``). Either way
the statistics are the whole tensor's, kept on every rank."""
from llmopt.optimizers import OptimizerSpec, Stage, all_tensors, largest


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    import torch
    from torch.distributed.tensor import DTensor

    from llmopt.optim import ShardedAdafactor, on_one_mesh_dim, param_groups, whole_tensor_optimizer

    kw = {} if impl == "auto" else {"foreach": impl == "foreach"}
    groups = param_groups(model, weight_decay)
    if any(isinstance(p, DTensor) for g in groups for p in g["params"]) and on_one_mesh_dim(groups):
        return ShardedAdafactor(groups, lr=lr, **kw)
    return whole_tensor_optimizer(torch.optim.Adafactor, groups, lr=lr, **kw)


def state_bytes(stage: Stage) -> int:
    """Per matrix a row and a column statistic of the whole tensor on every rank, per vector its second moment
    and a step count per tensor. Vectors are counted whole: on a 1-D mesh the sharded ones hold only their
    shard (some kilobytes less; TP replicates others, which ``Stage`` does not tell apart)."""
    return 4 * sum((sum(s) if len(s) == 2 else s[0]) + 1 for s in stage.tensors)


def transient_bytes(stage: Stage) -> int:
    """On a 1-D mesh every shard's update, held between the two all-reduces (a copy of the rank's parameters);
    on a 2-D mesh the largest tensor and its gradient, gathered whole (buckets of that size)."""
    if stage.shards == 1:
        return 0
    return 4 * stage.values if stage.mesh_dims == 1 else 2 * 4 * largest(stage.tensors)


def gathers(stage: Stage) -> list:
    """Every tensor, on a 2-D mesh only (a 1-D one sums statistics instead: ``mesh_reductions``)."""
    return all_tensors(stage) if stage.mesh_dims > 1 else []


SPEC = OptimizerSpec(
    name="adafactor", about="Adafactor, factored second moments (torch.optim.Adafactor)", build=build,
    default_lr=1e-2, lr_centre=1e-1, impls=("for-loop", "foreach"), state_bytes=state_bytes,
    transient_bytes=transient_bytes, gathers=gathers, gathered_per_tensor=2, mesh_reductions=2, order=60)
