"""AdamW (decoupled weight decay, Loshchilov & Hutter 2019): torch's ``torch.optim.AdamW``, the baseline every
other optimizer is compared with."""
from llmopt.optimizers import OptimizerSpec


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    import torch

    from llmopt.optim import impl_kwargs, param_groups

    groups = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, **impl_kwargs(impl, groups, fused_ok))


SPEC = OptimizerSpec(
    name="adamw", about="AdamW, decoupled weight decay (torch.optim.AdamW): the baseline", build=build,
    default_lr=3e-3, lr_centre=3e-3, impls=("for-loop", "foreach", "fused"), order=30)
