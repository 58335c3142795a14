"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled"): no decay schedule; the weights
evaluated and saved are an average of the iterates, the gradient is taken at an interpolation between that
average and the base iterate. The update is Meta's ``schedulefree.AdamWScheduleFree`` with its defaults
(betas (0.9, 0.999), warm-up by llmopt's --lr-warmup, which the method keeps). Its ``train()``/``eval()``
switch the model between the two points: llmopt evaluates and saves inside ``llmopt.optim.eval_weights``.
Elementwise, so it steps FSDP2/TP shards as plain tensors (``llmopt.optim.shard_optimizer``). It takes
--lr-schedule constant only: its averaging is the decay."""
from llmopt.optimizers import OptimizerSpec, Stage, moments


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    from schedulefree import AdamWScheduleFree

    from llmopt.optim import param_groups, shard_optimizer

    kw = {} if impl == "auto" else {"foreach": impl == "foreach"}
    optimizer = shard_optimizer(AdamWScheduleFree, param_groups(model, weight_decay), lr=lr, **kw)
    optimizer.train()  # it starts in eval mode and refuses to step there
    return optimizer


def transient_bytes(stage: Stage) -> int:
    """The foreach step's denominators, one fp32 tensor per parameter."""
    return 4 * stage.values


SPEC = OptimizerSpec(
    name="schedule-free", about="Schedule-Free AdamW, no decay schedule (schedulefree's AdamWScheduleFree)",
    build=build, default_lr=3e-3, lr_centre=3e-3, impls=("for-loop", "foreach"), state_bytes=moments(2),
    transient_bytes=transient_bytes, lr_schedules=("constant",), packages=(("schedulefree", "schedulefree"),),
    order=80)
