"""LAMB (You et al. 2019): llmopt's own (``llmopt.optim.Lamb``: torch has none), Adam's direction scaled per
tensor by the trust ratio ||w|| / ||r||, whose norms over DTensor shards are reduced over the mesh: every
tensor's in one all-reduce per sharded mesh dimension."""
from llmopt.optimizers import OptimizerSpec, Stage


def transient_bytes(stage: Stage) -> int:
    """Under FSDP2/TP every shard's direction r, held until the norms are reduced: a copy of the rank's
    parameters in fp32."""
    return 4 * stage.values if stage.shards > 1 else 0


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    from llmopt.optim import Lamb, param_groups

    return Lamb(param_groups(model, weight_decay), lr=lr)


SPEC = OptimizerSpec(
    name="lamb", about="LAMB, per-tensor trust ratios (llmopt.optim.Lamb)", build=build,
    default_lr=1e-2, lr_centre=1e-2, transient_bytes=transient_bytes, accelerate=False, reductions=1,
    order=40)
