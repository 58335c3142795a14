import pytest
import torch
from transformers import GPT2LMHeadModel

from llmopt import GPT, PRESETS, GPTConfig
from llmopt.core.shapes import flops_per_token, param_count
from llmopt.model import hf_config

SMALL = GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=97, block_size=32)


def test_causality_future_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, SMALL.vocab_size, (2, 7))
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)  # the change is visible where it may be


def test_forward_shapes_and_loss():
    model = GPT(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (3, 10))
    assert model(idx).shape == (3, 10, SMALL.vocab_size)
    loss = model(idx, targets=torch.randint(0, SMALL.vocab_size, (3, 10)))
    assert loss.dim() == 0
    # an untrained model predicts close to uniformly: loss near ln(V)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.2


def _hf(cfg, seed=0):
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(hf_config(cfg)).eval()
    with torch.no_grad():  # HF zero-initialises biases and unit LayerNorms: randomise everything
        for p in hf.parameters():
            p.normal_(0, 0.05)
    return hf


def test_from_hf_logits_match_and_every_weight_is_used():
    hf = _hf(SMALL)
    ours = GPT.from_hf(hf).eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 20))
    assert (hf(idx).logits - ours(idx)).abs().max() < 1e-4
    # every HF tensor (after tying) has a counterpart with the same number of values
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_hf == sum(p.numel() for p in ours.parameters()) == param_count(SMALL)
    # perturbing any single HF weight changes our model's output: nothing was left unused
    for name, p in hf.named_parameters():
        noise = 0.5 * torch.randn_like(p)  # random, not constant: LayerNorm would cancel a constant shift
        with torch.no_grad():
            p.add_(noise)
        moved = (GPT.from_hf(hf).eval()(idx) - ours(idx)).abs().max()
        with torch.no_grad():
            p.sub_(noise)
        assert moved > 1e-4, f"{name} is not used by from_hf"


def test_to_hf_round_trip():
    torch.manual_seed(1)
    ours = GPT(SMALL).eval()
    hf = ours.to_hf().eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 20))
    assert (hf(idx).logits - ours(idx)).abs().max() < 1e-4
    back = GPT.from_hf(hf)
    for (n, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_presets_and_accounting():
    assert param_count(PRESETS["gpt2"]) == 124_439_808  # GPT-2 small, tied head counted once
    tiny = PRESETS["tiny"]
    assert tiny.n_layer % 4 == 0 and tiny.n_head % 4 == 0
    assert GPT(tiny).num_params() == sum(p.numel() for p in GPT(tiny).parameters())
    # PaLM convention: 6 * (non-embedding params + head) + 12 * L * H * Q * T
    c = PRESETS["gpt2"]
    n = param_count(c, non_embedding=True) + c.vocab_size * c.n_embd
    assert flops_per_token(c, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_sequence_longer_than_positions_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        GPT(SMALL)(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("chunk_rows, scale", [(7, 1.0), (64, 1.0), (1000, 1.0), (64, 30.0)])
def test_fused_head_loss_and_gradients_match_plain_cross_entropy(chunk_rows, scale):
    """scale=30 puts targets over 100 nats below their row's maximum logit: the loss read off the softmax
    (logsumexp = max z - log max p) must still be the exact log-softmax one."""
    from llmopt.model import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = (scale * torch.randn(97, 16, dtype=torch.float64)).requires_grad_()
    t = torch.randint(0, 97, (50,))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t)
    gh_ref, gw_ref = torch.autograd.grad(3.0 * ref, (h, w))
    loss = linear_cross_entropy(h, w, t, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad(3.0 * loss, (h, w))  # an upstream gradient other than 1
    assert torch.allclose(loss.double(), ref, rtol=1e-9, atol=1e-6)
    assert torch.allclose(gh, gh_ref, atol=1e-6) and torch.allclose(gw, gw_ref, atol=1e-6)
    if scale > 1:
        assert ref.item() > 100  # the case the test is for


def test_fused_head_fp32_loss_far_below_the_row_maximum():
    """In fp32 exp(-100) underflows: a loss read as -log p[target] would be inf; the fused head's is exact."""
    from llmopt.model import linear_cross_entropy

    torch.manual_seed(1)
    h, w = torch.randn(40, 16), 40.0 * torch.randn(60, 16)
    t = torch.randint(0, 60, (40,))
    ref = torch.nn.functional.cross_entropy(h.double() @ w.double().t(), t)
    loss = linear_cross_entropy(h, w, t, chunk_rows=16)
    assert ref.item() > 100 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()


@pytest.mark.parametrize("T", [5, 64])
def test_causal_attention_bf16_cpu_path_matches_fp32_sdpa(T):
    """bf16 on a CPU with native bf16 takes llmopt's explicit attention (see explicit_attention); forced here
    on every CPU, it must compute causal SDPA."""
    from llmopt.model import EXPLICIT_ATTENTION_MAX_T, causal_attention

    assert T <= EXPLICIT_ATTENTION_MAX_T
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    low = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    out = causal_attention(*low, explicit=True)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.05
    # gradients too, against fp32 SDPA's
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    w = torch.randn_like(ref)
    torch.autograd.backward(torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=True), w)
    out.backward(w.bfloat16())
    for a, b in zip(low, ref_in):
        assert (a.grad.float() - b.grad).abs().max() < 0.1 * b.grad.abs().max()
    # and the first position attends to itself only
    assert torch.allclose(out[:, :, 0].float(), low[2][:, :, 0].detach().float())


def test_fused_head_under_autocast_tracks_fp32():
    from llmopt.model import linear_cross_entropy

    torch.manual_seed(0)
    h, w = torch.randn(64, 32, requires_grad=True), torch.randn(50, 32, requires_grad=True)
    t = torch.randint(0, 50, (64,))
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and gh.dtype == h.dtype and gw.dtype == w.dtype
    assert abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())


def test_explicit_attention_follows_the_cpu_flags(monkeypatch):
    from llmopt import cpu as precision
    from llmopt.model import explicit_attention

    monkeypatch.setattr(precision, "cpu_flags", lambda: ("avx512_bf16",))
    assert explicit_attention("cpu", torch.bfloat16, 256) and not explicit_attention("cpu", torch.bfloat16, 1024)
    assert not explicit_attention("cpu", torch.float32, 256) and not explicit_attention("cuda", torch.bfloat16, 256)
    monkeypatch.setattr(precision, "cpu_flags", lambda: ())  # no native bf16: emulated matmuls, keep SDPA
    assert not explicit_attention("cpu", torch.bfloat16, 256)
