"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an interpolation of the
momentum and the gradient, one momentum of state. The update is lion-pytorch's ``Lion`` (betas (0.9,
0.99); weight decay w <- w (1 - lr wd); its authors suggest a learning rate 3-10x below AdamW's; its default
and centre here were measured: results/README.md, "Learning-rate centres"). It
is elementwise, so it steps FSDP2/TP shards as plain tensors (``llmopt.optim.shard_optimizer``)."""
from llmopt.optimizers import OptimizerSpec, Stage, largest, moments


def build(model, lr: float, weight_decay: float, impl: str, fused_ok: bool):
    from lion_pytorch import Lion

    from llmopt.optim import param_groups, shard_optimizer

    return shard_optimizer(Lion, param_groups(model, weight_decay), lr=lr)


def transient_bytes(stage: Stage) -> int:
    """The update of one tensor at a time (a clone of the momentum, then the sum with the gradient), fp32, on
    this rank's shard of the largest."""
    return 2 * 4 * -(-largest(stage.tensors) // stage.shards)


SPEC = OptimizerSpec(
    name="lion", about="Lion, the sign of interpolated momentum (lion-pytorch's Lion)", build=build,
    default_lr=1e-3, lr_centre=1e-3, state_bytes=moments(1), transient_bytes=transient_bytes,
    packages=(("lion_pytorch", "lion-pytorch"),), order=70)
