"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"): Adam in the eigenbasis of
Shampoo's preconditioners, one pair (GG, Q) per side of each matrix, the eigenbasis refreshed every 10 steps.
The update is pytorch-optimizer's ``SOAP`` (a port of the paper's code) with its defaults: betas (0.95, 0.95),
the first step only starts the preconditioners, sides above 10,000 (a GPT-2 vocabulary) unpreconditioned,
vectors plain Adam, decoupled weight decay. The preconditioners are the whole matrix's, so under FSDP2/TP each
tensor and its gradient are gathered whole (``llmopt.optim.WholeTensors``) and the state is whole on every
rank, as Adafactor's."""
import math

from llmopt.optimizers import OptimizerSpec, Stage, all_tensors, largest

MAX_SIDE = 10_000  # pytorch-optimizer's max_precondition_dim


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    from pytorch_optimizer import SOAP

    from llmopt.optim import param_groups, whole_tensor_optimizer

    return whole_tensor_optimizer(SOAP, param_groups(model, weight_decay), lr=lr)


def state_bytes(stage: Stage) -> int:
    """Adam's two moments and, per side of each matrix up to MAX_SIDE, its statistic GG and eigenbasis Q,
    fp32, of the whole tensors."""
    moments = sum(2 * math.prod(t) for t in stage.tensors)
    sides = sum(2 * d * d for t in stage.tensors if len(t) >= 2 for d in t if d <= MAX_SIDE)
    return 4 * (moments + sides)


def transient_bytes(stage: Stage) -> int:
    """One tensor's gradient in the eigenbasis, its square, the projected momentum and the update, fp32; under
    FSDP2/TP also the largest tensor and its gradient, gathered whole."""
    big = largest(stage.tensors)
    return 4 * 4 * big + (2 * 4 * big if stage.shards > 1 else 0)


def update_flops(stage: Stage) -> float:
    """Per preconditioned side d of each matrix: the statistic's update and three projections through the
    eigenbasis (the gradient and the momentum in, the update out), each 2 d FLOPs per element of the matrix; the
    eigenbasis refresh every 10 steps is not priced."""
    return float(sum(4 * 2 * d * math.prod(t) for t in stage.tensors if len(t) >= 2 for d in t if d <= MAX_SIDE))


SPEC = OptimizerSpec(
    name="soap", about="SOAP, Adam in Shampoo's eigenbasis (pytorch-optimizer's SOAP)", build=build,
    default_lr=3e-3, lr_centre=1e-2, state_bytes=state_bytes, transient_bytes=transient_bytes,
    update_flops=update_flops, gathers=all_tensors, gathered_per_tensor=2,
    packages=(("pytorch_optimizer", "pytorch-optimizer"),), reproducible=False, order=90)
