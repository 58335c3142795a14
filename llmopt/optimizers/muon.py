"""Muon (Jordan et al. 2024; Liu et al. 2025): torch's ``torch.optim.Muon`` on the hidden matrices, torch's
AdamW on every other parameter, as one optimizer (``llmopt.optim.MuonAdamW``; why, and the learning-rate rule
that lets one --lr serve both: ``llmopt.optim``'s docstring). Under FSDP2 or TP each matrix's momentum is sent
whole to one owner rank, which orthogonalises it and sends each rank its piece of the update; on a 2-D mesh every
rank gathers and orthogonalises every matrix (``llmopt.optim.ShardedMuon``)."""
from llmopt.optimizers import OptimizerSpec, Stage, hidden_matrices, largest, ns_flops

NS_STEPS = 5  # torch.optim.Muon's default Newton-Schulz steps


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool, adamw_lr: float):
    from llmopt.optim import MuonAdamW

    return MuonAdamW(model, lr, weight_decay, impl, fused_ok, adamw_lr)


def state_bytes(stage: Stage) -> int:
    """A momentum on the hidden matrices, AdamW's two moments on the rest (sharded as the parameters are)."""
    return 4 * stage.hidden_values + 8 * (stage.values - stage.hidden_values)


def transient_bytes(stage: Stage) -> int:
    """The whole largest hidden matrix's momentum (gathered under FSDP2/TP), the update torch's Muon writes into
    and its zero momentum, fp32, and the Newton-Schulz iterates in bf16 (about 4 more of its size); under
    FSDP2/TP also buffers of a bucket (``ShardedMuon``: up to twice the mesh's ranks times the largest matrix, at
    most the stage's hidden matrices), fp32: on a 1-D mesh five of a rank's share of it (the pieces sent to the
    owners, the owned momenta received, their updates, the pieces sent back and those received), on a 2-D mesh
    the bucket's whole momenta and their updates."""
    big = largest(stage.hidden)
    out = (3 * 4 + 4 * 2) * big
    if stage.shards > 1:
        bucket = min(2 * stage.shards * big, sum(a * b for a, b in stage.hidden))
        out += 4 * (5 * bucket // stage.shards if stage.mesh_dims == 1 else 2 * bucket)
    return out


def update_flops(stage: Stage) -> float:
    """The Newton-Schulz iteration on every hidden matrix, whole: NS_STEPS iterations of ``ns_flops``
    multiply-adds, two FLOPs each."""
    return sum(NS_STEPS * 2 * ns_flops(shape) for shape in stage.hidden)


def bucket_times(ranks: int) -> int:
    """``ShardedMuon``'s gather buckets: about one largest matrix per rank and a spare, so that every rank has
    Newton-Schulz work in each."""
    return 2 * ranks


SPEC = OptimizerSpec(
    name="muon", about="Muon on the hidden matrices, AdamW on the rest (torch.optim.Muon + AdamW)", build=build,
    default_lr=3e-3, lr_centre=1e-2, state_bytes=state_bytes, transient_bytes=transient_bytes,
    update_flops=update_flops, gathers=hidden_matrices, gathered_per_tensor=1, bucket_times=bucket_times,
    splits_work=True, adamw_part=True, order=50)
