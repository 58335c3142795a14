"""SGD with momentum 0.9 and coupled (L2) weight decay: torch's ``torch.optim.SGD``."""
from llmopt.optimizers import OptimizerSpec, moments


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    import torch

    from llmopt.optim import torch_optimizer

    return torch_optimizer(torch.optim.SGD, model, lr, weight_decay, impl, fused_ok, momentum=0.9)


SPEC = OptimizerSpec(
    name="sgd", about="SGD, momentum 0.9, L2 weight decay (torch.optim.SGD)", build=build,
    default_lr=0.1, lr_centre=0.1, impls=("for-loop", "foreach", "fused"), state_bytes=moments(1), order=10)
