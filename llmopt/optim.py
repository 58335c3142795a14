"""Optimizers: torch's SGD, Adam and AdamW, and LAMB (You et al. 2019), behind one ``build_optimizer``; the
learning-rate schedule (linear warm-up, then constant, cosine or linear decay) as torch's ``LambdaLR``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def full_norm(t: torch.Tensor) -> torch.Tensor:
    """The 2-norm of the whole tensor, also when it is a DTensor sharded over TP or FSDP ranks."""
    n = torch.linalg.vector_norm(t)
    return n.full_tensor() if isinstance(n, DTensor) else n


class Lamb(torch.optim.Optimizer):
    """LAMB, Algorithm 2 of You et al. 2019, "Large Batch Optimization for Deep Learning" (arXiv:1904.00962),
    with the identity scaling function phi and no clipping inside:

        m = b1*m + (1-b1)*g            v = b2*v + (1-b2)*g^2
        m_hat = m/(1-b1^t)             v_hat = v/(1-b2^t)
        r = m_hat/(sqrt(v_hat)+eps) + wd*w
        ratio = ||w|| / ||r||  (1 where either norm is 0)
        w <- w - lr*ratio*r

    The norms are over the whole tensor: for a DTensor parameter (TP or FSDP shard) the elementwise update
    runs on the local shard and the two norms are reduced over the mesh, so the trust ratio is that of the
    unsharded tensor.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Lamb: invalid hyper-parameters lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt_().add_(eps))
                if wd:
                    r.add_(p, alpha=wd)
                w_norm, r_norm = full_norm(p), full_norm(r)
                ratio = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm))
                if isinstance(p, DTensor):  # update the local shard with the replicated scalar ratio
                    p.to_local().sub_(r.to_local() * (lr * ratio))
                else:
                    p.sub_(r * (lr * ratio))
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (2+ dims) only; never on biases or LayerNorm gains."""
    groups: dict[bool, list] = {}
    for p in model.parameters():  # deduplicated: a tied weight appears once
        if p.requires_grad:
            groups.setdefault(p.dim() >= 2, []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0}
            for decay, ps in sorted(groups.items(), reverse=True)]


def _impl_kwargs(impl: str, params: list[torch.Tensor], fused_ok: bool) -> dict:
    if impl == "for-loop":
        return {"foreach": False}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "fused":
        return {"fused": True}
    # auto: fused kernels for plain tensors on CPU/CUDA, foreach where DTensors are involved or fused is ruled out
    if not fused_ok or any(isinstance(p, DTensor) for p in params):
        return {"foreach": True}
    return {"fused": True}


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                    impl: str = "auto", fused_ok: bool = True) -> torch.optim.Optimizer:
    """sgd (momentum 0.9, L2 decay), adam (L2 decay, coupled), adamw (decoupled decay), lamb.
    ``fused_ok=False`` keeps ``auto`` off the fused kernels (see ``llmopt.precision.fused_optimizer_ok``)."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    if name == "lamb":
        return Lamb(groups, lr=lr)
    kw = _impl_kwargs(impl, params, fused_ok)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, **kw)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, **kw)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kw)
    raise ValueError(f"--optimizer: unknown value {name!r}; choose one of sgd, adam, adamw, lamb")


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``, as a fraction of the peak.

    Linear warm-up over the first ``warmup`` steps, reaching the peak at step ``warmup - 1``; then
    ``constant`` stays at the peak, ``cosine`` follows min + (1 - min) * (1 + cos(pi * p)) / 2 (Loshchilov &
    Hutter 2017, without restarts) and ``linear`` min + (1 - min) * (1 - p), where p runs from 0 at the first
    step after warm-up to 1 at the last step, so the last step uses min_ratio * peak.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - p)
    raise ValueError(f"--lr-schedule: unknown value {schedule!r}; choose one of constant, cosine, linear")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR over ``lr_factor``; stepped once per optimizer step, after it."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.lr_schedule, cfg.lr_warmup, cfg.steps, cfg.min_lr_ratio))
