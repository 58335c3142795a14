"""Adam with coupled (L2) weight decay: torch's ``torch.optim.Adam``."""
from llmopt.optimizers import OptimizerSpec


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    import torch

    from llmopt.optim import torch_optimizer

    return torch_optimizer(torch.optim.Adam, model, lr, weight_decay, impl, fused_ok)


SPEC = OptimizerSpec(
    name="adam", about="Adam, L2 weight decay (torch.optim.Adam)", build=build,
    default_lr=3e-3, lr_centre=3e-3, impls=("for-loop", "foreach", "fused"), order=20)
