"""LAMB (You et al. 2019): llmopt's own (``llmopt.optim.Lamb``: torch has none), Adam's direction scaled per
tensor by the trust ratio ||w|| / ||r||, whose norms over DTensor shards are reduced over the mesh: one
all-reduce per parameter group (decayed and not) and placement."""
from llmopt.optimizers import OptimizerSpec


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    from llmopt.optim import Lamb, param_groups

    return Lamb(param_groups(model, weight_decay), lr=lr)


SPEC = OptimizerSpec(
    name="lamb", about="LAMB, per-tensor trust ratios (llmopt.optim.Lamb)", build=build,
    default_lr=1e-2, lr_centre=1e-2, accelerate=False, reductions=1, order=40)
