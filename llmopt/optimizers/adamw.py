"""AdamW (decoupled weight decay, Loshchilov & Hutter 2019): torch's ``torch.optim.AdamW``, the baseline every
other optimizer is compared with."""
from llmopt.optimizers import OptimizerSpec


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    import torch

    from llmopt.optim import torch_optimizer

    return torch_optimizer(torch.optim.AdamW, model, lr, weight_decay, impl, fused_ok)


SPEC = OptimizerSpec(
    name="adamw", about="AdamW, decoupled weight decay (torch.optim.AdamW): the baseline", build=build,
    default_lr=3e-3, lr_centre=3e-3, impls=("for-loop", "foreach", "fused"), order=30)
