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
REFRESH_EVERY = 10  # pytorch-optimizer's precondition_frequency: steps between eigenbasis refreshes


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
    """The larger of two moments of its step, fp32: the update of one tensor (its gradient in the eigenbasis, its
    square, the projected momentum and the update), and the eigenbasis refresh every 10 steps, which for each
    matrix builds its new bases beside the old ones, one side at a time (the product GG Q, its columns sorted,
    and QR's Q and R: four d x d on the side under way, the finished sides' new bases, and two re-ordered
    copies of the second moment). Under FSDP2/TP also the largest tensor and its gradient, gathered whole.
    The refresh counts where the run reaches one, the step measured after it included (``stage.steps`` >= 10: the
    first refresh is SOAP's 11th step); that measured step is then a refresh (``heavy_every``,
    ``llmopt.loop.memory_step``), so a sweep of 6 steps never pays it and one of 128 measures it."""
    big = largest(stage.tensors)
    refresh = 0
    if stage.steps >= REFRESH_EVERY:
        for t in (t for t in stage.tensors if len(t) >= 2):
            done = 0  # the new bases of the sides already refreshed (SOAP goes through them in order)
            for d in (d for d in t if d <= MAX_SIDE):
                refresh = max(refresh, done + 4 * d * d + 2 * math.prod(t))
                done += d * d
    return 4 * max(4 * big, refresh) + (2 * 4 * big if stage.shards > 1 else 0)


def update_flops(stage: Stage) -> float:
    """Per preconditioned side d of each matrix: the statistic's update and three projections through the
    eigenbasis (the gradient and the momentum in, the update out), each 2 d FLOPs per element of the matrix; the
    eigenbasis refresh every 10 steps is not priced."""
    return float(sum(4 * 2 * d * math.prod(t) for t in stage.tensors if len(t) >= 2 for d in t if d <= MAX_SIDE))


SPEC = OptimizerSpec(
    name="soap", about="SOAP, Adam in Shampoo's eigenbasis (pytorch-optimizer's SOAP)", build=build,
    default_lr=3e-3, lr_centre=1e-2, state_bytes=state_bytes, transient_bytes=transient_bytes,
    heavy_every=REFRESH_EVERY,
    update_flops=update_flops, gathers=all_tensors, gathered_per_tensor=2,
    packages=(("pytorch_optimizer", "pytorch-optimizer"),), reproducible=False, order=90)
