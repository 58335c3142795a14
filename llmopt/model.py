"""A single-device GPT with the GPT-2 architecture, weight-compatible with Hugging Face's GPT2LMHeadModel.

Architecture (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"): learned token and
position embeddings, pre-LayerNorm blocks (LN -> causal self-attention -> residual, LN -> MLP -> residual),
a tanh-approximated GELU MLP of width 4C, a final LayerNorm, and an output head tied to the token embedding.
Every linear layer has a bias.

The model knows nothing about distribution or the training loop. Two layout choices make the parallel
wrappers possible without the model asking whether it is wrapped:

* The fused QKV projection stores its output features grouped by head, ``(n_head, 3, head_dim)``, so that a
  column-wise tensor-parallel split hands each rank whole heads; the head count used in ``forward`` is read
  off the tensor's shape, so it is the local head count under tensor parallelism.
* ``forward`` works on whichever parts it holds (``wte`` / ``h`` / ``ln_f``), so a pipeline stage is this
  same module with the blocks of other stages removed (see ``llmopt.distributed.pipeline``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.core.shapes import GPTConfig, param_count


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        self.head_dim = cfg.head_dim
        # Output features ordered (head, {q,k,v}, head_dim): see the module docstring.
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.c_attn(x).view(B, T, -1, 3, self.head_dim)  # (B, T, nh, 3, hs); nh is local under TP
        # Unbound on the q/k/v axis itself, so backward stacks dq, dk, dv straight into c_attn's output layout
        # (permuting first made backward stack, then copy once more to undo the permute).
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))    # each (B, nh, T, hs)
        y = causal_attention(q, k, v)                           # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)                 # (B, T, nh*hs)
        return self.c_proj(y)


# Longest sequence for which the explicit attention below is used: it keeps the (B, nh, T, T) scores, and
# past this its cost grows faster than the flash kernel's (results/reference/cpu-kernels/kernels.md).
EXPLICIT_ATTENTION_MAX_T = 256


def explicit_attention(device_type: str, dtype: torch.dtype, T: int) -> bool:
    """Whether ``causal_attention`` takes its explicit path: bf16 on a CPU with native bf16 matrix kernels
    (AVX512-BF16 or AMX), T <= EXPLICIT_ATTENTION_MAX_T. The measurement behind the rule is
    ``python -m bench.kernels`` (committed in results/reference/cpu-kernels/): on such a CPU torch's CPU flash
    kernel is the slower one in bf16 at short sequences, the explicit path at long ones; without native bf16
    the explicit path's bf16 matmuls are emulated, so SDPA is kept (not measured on such a CPU yet: the
    rule errs towards torch's kernel)."""
    from llmopt.cpu import cpu_has_native_bf16

    return (device_type == "cpu" and dtype == torch.bfloat16 and T <= EXPLICIT_ATTENTION_MAX_T
            and cpu_has_native_bf16())


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, explicit: bool | None = None) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hs)) v over (B, nh, T, hs) tensors.

    ``F.scaled_dot_product_attention`` unless ``explicit_attention`` says otherwise (``explicit`` forces the
    choice, for tests and measurements): then three plain ops (batched matmul, scaled add of a -inf upper
    triangle, softmax) and a matmul, with the (B, nh, T, T) scores materialised.
    """
    T = q.size(-2)
    if explicit is None:
        explicit = explicit_attention(q.device.type, q.dtype, T)
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = torch.add(future, q @ k.transpose(-1, -2), alpha=q.size(-1) ** -0.5)
    return torch.softmax(scores, dim=-1) @ v


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        # A ModuleDict keyed by the global layer index keeps parameter names stable when a pipeline stage
        # drops the blocks it does not own.
        self.h = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms, and the residual
        projections scaled by 1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                p.fill_(1.0)
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                p.normal_(0.0, std)

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids (or, on a later pipeline stage, (B, T, C) hidden states).

        Returns logits (B, T, vocab) or, with ``targets``, the mean cross-entropy as a scalar tensor (fused
        with the head: no (B, T, vocab) logits); a pipeline stage without the head returns its hidden states.
        """
        if self.wte is not None:
            T = idx.size(1)
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
            x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        else:
            x = idx
        for block in self.h.values():
            x = block(x)
        if self.ln_f is None:  # a pipeline stage before the last hands on its hidden states
            return x
        h = self.ln_f(x)
        weight = local_tensor(self.lm_head_weight)
        if targets is None:
            return F.linear(h, weight)  # (B, T, V); tied head, no bias
        return linear_cross_entropy(h.flatten(0, 1), weight, targets.reshape(-1))

    @property
    def lm_head_weight(self) -> torch.Tensor:
        # Tied to the token embedding. A last pipeline stage without `wte` keeps its own copy, `lm_head`,
        # whose gradient the pipeline sums with the first stage's (see distributed/pipeline.py).
        return self.wte.weight if self.wte is not None else self.lm_head.weight

    # ------------------------------------------------------------------ Hugging Face interop
    @classmethod
    def from_hf(cls, hf_model) -> "GPT":
        """Build from a transformers ``GPT2LMHeadModel``; every weight is used."""
        return _from_hf(hf_model)

    def to_hf(self):
        """A transformers ``GPT2LMHeadModel`` with this model's weights."""
        return _to_hf(self)

    # ------------------------------------------------------------------ accounting
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters of the full model (the tied head counted once). ``non_embedding`` leaves out the
        token and position embeddings, the N of Kaplan et al. 2020."""
        return param_count(self.config, non_embedding)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's local copy, any other tensor as it is. Under tensor parallelism the tied head's
    weight is a DTensor replicated on the TP mesh (``llmopt.distributed.tensor_parallel``) while the final
    hidden states are plain, so the head runs on the local copy; ``to_local``'s backward hands the gradient back
    as a replicated DTensor, which it is: every TP rank computes the same one. Duck-typed, so the single-device
    model does not import torch.distributed. (A module boundary around the head, where a TP input hook could do
    this, makes MemTracker count part of the head's saved gradients as parameter gradients.)"""
    return t.to_local() if hasattr(t, "to_local") else t


# Rows of logits the fused head holds at once: small enough to stay in cache, large enough for efficient
# matmuls (``python -m bench.kernels`` measures 128-1024; results/reference/cpu-kernels/).
HEAD_CHUNK_ROWS = 256


class LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ W^T, targets)) without materialising the (N, V) logits.

    The rows are taken in chunks; for each chunk the forward computes the logits, the loss and at once the
    gradients w.r.t. h and W (softmax - onehot, then two matmuls), and frees the chunk's logits. Backward
    only scales the stored gradients. Same FLOPs as the plain head + loss, but no N x V tensor is kept for
    backward (the plain path keeps the log-probabilities and writes three N x V buffers in backward), which
    saves memory and, on CPU, cache traffic. The idea is Liger-Kernel's fused linear cross-entropy.

    One pass over each chunk's logits: ``softmax`` in the logits' dtype (computed in fp32 inside), from which
    the loss is read without a log-softmax: the softmax at a row's largest logit m is exactly
    1 / sum(exp(z - m)), so logsumexp(z) = max(z) - log(max(p)) (max(p) >= 1/V never underflows) and the
    row's loss is that minus z[target]. In fp32 this is the log-softmax loss to rounding; under bf16 autocast
    max(p) is rounded to bf16 (relative error <= 2^-9), which moves a token's loss by at most 0.002 nats,
    against the 0.05-nat AMP tolerance of the parity checks. ``python -m bench.kernels`` measures this head
    against the plain one (results/reference/cpu-kernels/).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        n = h.size(0)
        ctx.n, ctx.dtypes = n, (h.dtype, weight.dtype)  # gradients are returned in the inputs' dtypes
        amp = torch.is_autocast_enabled(h.device.type)
        acc = torch.float32 if amp else h.dtype  # accumulation dtype of the gradients
        if amp:  # cast once for all chunks (autocast would cache only the weight's cast)
            low = torch.get_autocast_dtype(h.device.type)
            h, weight_mm = h.to(low), weight.to(low)
        else:
            weight_mm = weight
        grad_h = torch.empty(h.shape, dtype=acc, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        loss = torch.zeros((), dtype=torch.promote_types(acc, torch.float32), device=h.device)
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen explicitly here
            for start in range(0, n, chunk_rows):
                hc, tc = h[start : start + chunk_rows], targets[start : start + chunk_rows]
                z = hc @ weight_mm.t()                                           # (c, V) logits
                g = torch.softmax(z, dim=-1)
                rows = torch.arange(g.size(0), device=g.device)
                # logsumexp; softmax is monotonic, so max(p) is p at max(z). amax: no index pass
                lse = z.amax(dim=-1).to(loss.dtype) - g.amax(dim=-1).to(loss.dtype).log()
                loss += (lse - z[rows, tc].to(loss.dtype)).sum()
                g[rows, tc] -= 1.0                                               # d(sum CE)/d logits
                if amp:  # low-precision matmuls, fp32 results
                    grad_h[start : start + chunk_rows] = g @ weight_mm
                    grad_w.add_(g.t() @ hc)
                else:  # no temporaries: write straight into the outputs
                    torch.mm(g, weight_mm, out=grad_h[start : start + chunk_rows])
                    grad_w.addmm_(g.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return (loss / n).to(acc)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        return (grad_h * scale).to(ctx.dtypes[0]), (grad_w * scale).to(ctx.dtypes[1]), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = HEAD_CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of the tied head's logits; see LinearCrossEntropy."""
    return LinearCrossEntropy.apply(h, weight, targets, chunk_rows)


# ---------------------------------------------------------------------- Hugging Face interop
def _qkv_perm(cfg: GPTConfig) -> torch.Tensor:
    """Index that maps HF's c_attn output order (3, n_head, hs) to ours (n_head, 3, hs)."""
    H, D = cfg.n_head, cfg.head_dim
    return torch.arange(3 * cfg.n_embd).view(3, H, D).transpose(0, 1).reshape(-1)


def config_from_hf(hf_config) -> GPTConfig:
    """The GPTConfig of a transformers GPT2Config, refused (one ValueError naming the setting) unless llmopt's
    GPT computes exactly that model: tanh-GELU, a head tied to the token embedding, attention scaled by
    1/sqrt(head size) alone, an MLP of width 4C, no cross-attention."""
    h = hf_config
    C = h.n_embd
    refused = [(getattr(h, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"),
                f"activation_function={getattr(h, 'activation_function', None)!r} (llmopt uses tanh-GELU)"),
               (not getattr(h, "tie_word_embeddings", True),
                "tie_word_embeddings=False (llmopt's head is the token embedding; its own lm_head would be dropped)"),
               (not getattr(h, "scale_attn_weights", True),
                "scale_attn_weights=False (llmopt scales attention scores by 1/sqrt(head size))"),
               (getattr(h, "scale_attn_by_inverse_layer_idx", False),
                "scale_attn_by_inverse_layer_idx=True (llmopt does not scale by layer)"),
               (getattr(h, "add_cross_attention", False), "add_cross_attention=True (llmopt has none)"),
               (getattr(h, "n_inner", None) not in (None, 4 * C), f"n_inner={getattr(h, 'n_inner', None)} (llmopt's "
                                                                 f"MLP is 4 x n_embd = {4 * C})"),
               (C % h.n_head != 0, f"n_embd={C} not a multiple of n_head={h.n_head}")]
    for bad, what in refused:
        if bad:
            raise ValueError(f"unsupported GPT-2 setting {what}; llmopt trains only the GPT-2 it computes exactly")
    return GPTConfig(n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd,
                     vocab_size=hf_config.vocab_size, block_size=hf_config.n_positions,
                     layer_norm_epsilon=hf_config.layer_norm_epsilon)


def hf_config(cfg: GPTConfig, **overrides):
    """A transformers GPT2Config of the same shape. Dropout is off so the two models compute the same
    function; pass overrides (e.g. resid_pdrop=0.1) for HF's defaults."""
    from transformers import GPT2Config

    kw = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
              n_positions=cfg.block_size, layer_norm_epsilon=cfg.layer_norm_epsilon,
              activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
              tie_word_embeddings=True, bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)
    kw.update(overrides)
    return GPT2Config(**kw)


def _from_hf(hf_model) -> GPT:
    cfg = config_from_hf(hf_model.config)
    model = GPT(cfg)
    sd = hf_model.state_dict()
    perm = _qkv_perm(cfg)
    # HF uses Conv1D, whose weight is (in, out): transpose to nn.Linear's (out, in).
    with torch.no_grad():
        model.wte.weight.copy_(sd["transformer.wte.weight"])
        model.wpe.weight.copy_(sd["transformer.wpe.weight"])
        model.ln_f.weight.copy_(sd["transformer.ln_f.weight"])
        model.ln_f.bias.copy_(sd["transformer.ln_f.bias"])
        for i, block in model.h.items():
            p = f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                getattr(block, ln).weight.copy_(sd[p + ln + ".weight"])
                getattr(block, ln).bias.copy_(sd[p + ln + ".bias"])
            block.attn.c_attn.weight.copy_(sd[p + "attn.c_attn.weight"].t()[perm])
            block.attn.c_attn.bias.copy_(sd[p + "attn.c_attn.bias"][perm])
            for ours, theirs in ((block.attn.c_proj, "attn.c_proj"), (block.mlp.c_fc, "mlp.c_fc"),
                                 (block.mlp.c_proj, "mlp.c_proj")):
                ours.weight.copy_(sd[p + theirs + ".weight"].t())
                ours.bias.copy_(sd[p + theirs + ".bias"])
    return model


def _to_hf(self: GPT):
    from transformers import GPT2LMHeadModel

    cfg = self.config
    hf = GPT2LMHeadModel(hf_config(cfg))
    inv = torch.argsort(_qkv_perm(cfg))
    sd = {"transformer.wte.weight": self.wte.weight, "transformer.wpe.weight": self.wpe.weight,
          "transformer.ln_f.weight": self.ln_f.weight, "transformer.ln_f.bias": self.ln_f.bias,
          "lm_head.weight": self.wte.weight}
    for i, block in self.h.items():
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"] = getattr(block, ln).weight
            sd[p + ln + ".bias"] = getattr(block, ln).bias
        sd[p + "attn.c_attn.weight"] = block.attn.c_attn.weight[inv].t()
        sd[p + "attn.c_attn.bias"] = block.attn.c_attn.bias[inv]
        for ours, theirs in ((block.attn.c_proj, "attn.c_proj"), (block.mlp.c_fc, "mlp.c_fc"),
                             (block.mlp.c_proj, "mlp.c_proj")):
            sd[p + theirs + ".weight"] = ours.weight.t()
            sd[p + theirs + ".bias"] = ours.bias
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    # HF registers a non-persistent causal-mask buffer in some versions; nothing else may be missing.
    missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith(".masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: missing {missing}, unexpected {unexpected}")
    return hf


