import math

import pytest
import torch

from llmopt import GPT, GPTConfig
from llmopt.optim import Lamb, build_optimizer


def lamb_reference(w, grads, lr, b1, b2, eps, wd):
    """LAMB (You et al. 2019, Algorithm 2) on Python floats, element by element, written from the paper."""
    w = list(w)
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        r = [(mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps) + wd * wi for mi, vi, wi in zip(m, v, w)]
        wn = math.sqrt(sum(x * x for x in w))
        rn = math.sqrt(sum(x * x for x in r))
        ratio = wn / rn if wn > 0 and rn > 0 else 1.0
        w = [wi - lr * ratio * ri for wi, ri in zip(w, r)]
    return w


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("zero_init", [False, True])
def test_lamb_matches_scalar_reference(wd, zero_init):
    torch.manual_seed(0)
    w0 = torch.zeros(3, 4, dtype=torch.float64) if zero_init else torch.randn(3, 4, dtype=torch.float64)
    grads = [torch.randn(3, 4, dtype=torch.float64) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = Lamb([p], lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = lamb_reference(w0.flatten().tolist(), [g.flatten().tolist() for g in grads], 0.05, 0.9, 0.99, 1e-6, wd)
    assert torch.allclose(p.detach().flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    if zero_init:  # ||w|| = 0 at step 1 -> ratio 1, so the first update is lr * r, not zero
        assert p.detach().abs().sum() > 0


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8))
    for name in ("sgd", "adam", "adamw", "lamb"):
        opt = build_optimizer(name, model, lr=1e-3, weight_decay=0.3)
        for g in opt.param_groups:
            dims = {p.dim() for p in g["params"]}
            assert g["weight_decay"] == (0.3 if min(dims) >= 2 else 0.0), (name, dims)
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_torch_optimizers_are_the_expected_classes():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8))
    sgd = build_optimizer("sgd", model, lr=0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert type(build_optimizer("adam", model, lr=1e-3)) is torch.optim.Adam
    assert type(build_optimizer("adamw", model, lr=1e-3)) is torch.optim.AdamW
    assert build_optimizer("adamw", model, lr=1e-3, impl="foreach").param_groups[0]["foreach"] is True


def test_muon_needs_a_hidden_matrix():
    """Muon updates the attention and MLP matrices; a model without any is refused in one line."""
    import torch.nn as nn

    from llmopt.optim import build_optimizer

    with pytest.raises(ValueError, match="no hidden 2-D weight matrix"):
        build_optimizer("muon", nn.Sequential(nn.Linear(4, 4)), lr=1e-3)


def test_muon_takes_the_matrices_and_adamw_the_rest():
    from llmopt.core.shapes import PRESETS
    from llmopt.model import GPT
    from llmopt.optim import HIDDEN_MATRICES, MuonAdamW, build_optimizer

    model = GPT(PRESETS["tiny"])
    opt = build_optimizer("muon", model, lr=3e-3, weight_decay=0.01)
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {n for n, p in model.named_parameters() if n.endswith(HIDDEN_MATRICES)} and len(names) == 16
    assert opt.param_groups[0] is opt.muon.param_groups[0]  # one schedule reaches both
    everything = {id(p) for g in opt.param_groups for p in g["params"]}
    assert everything == {id(p) for p in model.parameters()}
