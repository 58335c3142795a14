"""SGD with momentum 0.9 and coupled (L2) weight decay: torch's ``torch.optim.SGD``."""
from llmopt.optimizers import OptimizerSpec, moments


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    import torch

    from llmopt.optim import impl_kwargs, param_groups

    groups = param_groups(model, weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, **impl_kwargs(impl, groups, fused_ok))


SPEC = OptimizerSpec(
    name="sgd", about="SGD, momentum 0.9, L2 weight decay (torch.optim.SGD)", build=build,
    default_lr=0.1, lr_centre=0.1, impls=("for-loop", "foreach", "fused"), state_bytes=moments(1), order=10)
