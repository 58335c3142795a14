"""Analytic memory prediction per rank, in the categories the measurement uses (``llmopt.instruments``):

    parameters, gradients, optimizer_state, activations (saved for backward + the loss's temporaries)

All figures are bytes on the most loaded rank (the harness reports the maximum over ranks). The model follows
what this code base allocates, in the spirit of Korthikanti et al. 2022 ("Reducing Activation Recomputation
in Large Transformer Models", section 4.1), re-derived for llmopt's block with SDPA (no T x T attention
matrix is kept, except on the explicit bf16 CPU path of ``model.causal_attention``, see below):

* per block and token, the tensors saved for backward are the two LayerNorm inputs and outputs (4C), the
  fused QKV output (3C), the attention output and its (B, T, C) copy for c_proj (2C), the MLP's hidden
  pre-activation and GELU output (8C): 17C values, of which the 13C after a column-parallel projection are
  split over TP ranks. Under autocast the matmul inputs/outputs are 16-bit, LayerNorm inputs stay fp32.
  Where ``model.causal_attention`` takes its explicit path (``model.explicit_attention``: llmopt's model,
  bf16 on a CPU with native bf16, T <= 256) each
  block also keeps its attention probabilities: n_head / tp * T bf16 values per token.
* llmopt's fused head (``model.LinearCrossEntropy``) keeps the final LayerNorm's input (C) and the
  gradient of its output (C) per token, the head's weight gradient (V x C) and, while it runs, one chunk's
  logits and softmax (in the matmul dtype); a pipeline's last stage computes the same fused loss (its targets
  come through its schedule) and keeps one weight gradient per chunk in flight. Where logits are materialised
  (HF's model) the head keeps the LayerNorm input and output (2C) and the log-probabilities (V) per token, and the
  backward of the loss two more V-sized temporaries. HF's ``gelu_new`` is written in Python ops and keeps
  three more 4C tensors per block.
* with activation checkpointing a block keeps only its input (C, fp32) and backward recomputes one block
  at a time. The peak then falls inside backward, while a block is recomputed, with the head's weight
  gradient and the later blocks' gradients already written: they are counted as gradients (an upper
  bound: every block but the first). torch.compile is predicted as eager (inductor usually saves less: the
  error column shows it), except HF's block on CUDA (see ``_act_bytes_per_token``).
* otherwise the peak is at the start of backward: parameters + optimizer state + activations + loss
  temporaries; gradients add to it only when they survive from an earlier accumulation micro-batch or
  pipeline chunk (unsharded under FSDP2 until it syncs), or as DDP's buckets. Under autocast its 16-bit
  weight copies (of the gathered weights under FSDP2) live until it exits.

``tests/test_memory.py`` checks every ok row of every committed reference against this model (15% band);
the reports' "pred err" column holds the figures.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from llmopt.core.config import TrainConfig, resolve_device
from llmopt.core.shapes import stage_layers, stage_params
from llmopt.model import HEAD_CHUNK_ROWS, explicit_attention
from llmopt.optimizers import spec, stage_view

CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations")


@dataclass
class MemoryPrediction:
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def optimizer_state_bytes(cfg: TrainConfig, stage: int, n: int) -> int:
    """Optimizer state on one rank of ``stage`` holding ``n`` parameter values: the optimizer's own formula
    (``llmopt.optimizers``: its spec's ``state_bytes``)."""
    return spec(cfg.optimizer).state_bytes(stage_view(cfg, stage, n))


def one_block_params(cfg: TrainConfig) -> int:
    """Parameter values of one transformer block on one rank (TP shards counted per rank)."""
    return stage_params(replace(cfg, pp=cfg.model_config.n_layer), 1)


def _act_bytes_per_token(cfg: TrainConfig, stage: int, dtype_bytes: int) -> float:
    m = cfg.model_config
    C, V, tp = m.n_embd, m.vocab_size, cfg.tp
    half = dtype_bytes  # 4 in fp32, 2 under autocast
    per_layer = 4 * C * 4 if half == 4 else (2 * C * 4 + 2 * C * 2)  # LN inputs fp32, LN outputs cast
    per_layer += 13 * C / tp * half
    if cfg.model_impl == "llmopt" and cfg.precision == "bf16" and explicit_attention(
            resolve_device(cfg.device), torch.bfloat16, cfg.seq_len):
        per_layer += m.n_head / tp * cfg.seq_len * 2  # the explicit attention's probabilities
    if cfg.model_impl == "hf":
        device = resolve_device(cfg.device)
        if not (cfg.compile and device == "cuda"):
            # transformers' gelu_new is Python ops: backward keeps tanh(.), 1 + tanh(.) and 0.5 * x, 4C each.
            # Compiled, inductor fuses the chain and keeps none of them; that shows only on CUDA, where the
            # peak is the allocator's: on CPU the harness measures an extra step under MemTracker, whose
            # dispatch mode runs the blocks eagerly (the CPU references' compile rows equal their eager ones).
            per_layer += 12 * C / tp * half
            if device == "cuda" and half == 2:
                # CUDA autocast runs pow in fp32 (its op list; CPU's does not): the fp32 copy of the 4C
                # pre-activation is kept too (measured +16C bytes a token and layer: results/reference/h200-peers)
                per_layer += 4 * C / tp * 4
    n_layers = len(stage_layers(m.n_layer, cfg.pp, stage))
    head = 0
    if stage == cfg.pp - 1:
        if cfg.model_impl == "hf":  # logits -> cross-entropy: log-probs, two backward temps
            head = 2 * C * 4 + 3 * V * 4
        else:  # llmopt's fused linear + cross-entropy: LN input and the stored gradient of h
            head = 2 * C * 4
    if cfg.activation_checkpointing:
        # each block keeps only its fp32 input; backward recomputes one block at a time, after the head's
        # temporaries are gone: the peak is the larger of the two
        return n_layers * C * 4 + max(head, per_layer if n_layers else 0)
    return n_layers * per_layer + head


def predict_memory(cfg: TrainConfig) -> MemoryPrediction:
    """Predicted peak tensor memory of the most loaded rank for a validated TrainConfig."""
    best = None
    m = cfg.model_config
    fsdp = cfg.dp > 1 and cfg.dp_mode == "fsdp"
    for stage in range(cfg.pp):
        full = stage_params(cfg, stage)
        n = -(-full // cfg.dp) if fsdp else full  # FSDP shards over dp (rounded up)
        params = 4 * n
        grads = 0
        pp_chunks = cfg.pp > 1 and cfg.pp_microbatches > 1
        if cfg.grad_accum > 1 or (pp_chunks and cfg.pp_schedule == "1f1b"):
            # gradients alive while activations are: kept across micro-batches (FSDP2 keeps them unsharded
            # until the syncing micro-batch; a pipeline stage syncs only on its last chunk), or 1F1B's first
            # backward running while later chunks are in flight
            grads += 4 * (full if fsdp and (cfg.grad_accum > 1 or pp_chunks) else n)
            if cfg.pp > 1 and cfg.dp > 1 and cfg.grad_accum > 1:
                # under a pipeline DP syncs every accumulation micro-batch (PipelineStage decides), so the
                # reduced gradients of the earlier ones sit beside the next one's unreduced accumulation
                grads += 4 * n
        if fsdp:
            # all-gathered while in use: the root's parameters (not resharded after forward) and one block's
            one_block = one_block_params(cfg)
            params += 4 * (full - len(stage_layers(m.n_layer, cfg.pp, stage)) * one_block + one_block)
        fused_head = stage == cfg.pp - 1 and cfg.model_impl == "llmopt"
        if cfg.activation_checkpointing and fused_head and cfg.tp == 1:
            # checkpointed blocks are small, so the peak moves into backward, while a block is recomputed:
            # the head's weight gradient and the gradients of the blocks after it already exist (bounded
            # here by all blocks but the first)
            later = full - (one_block_params(cfg) if m.n_layer > 1 else 0)
            grads = max(grads, 4 * (-(-later // cfg.dp) if fsdp else later))  # not on top of kept ones
        ddp = cfg.dp > 1 and cfg.dp_mode == "ddp"
        if ddp and cfg.tp == 1 and cfg.pp == 1:
            grads += params  # DistributedDataParallel's gradient buckets
        opt = optimizer_state_bytes(cfg, stage, n)
        if ddp and (cfg.tp > 1 or cfg.pp > 1):
            params *= 2  # composable replicate keeps an unsharded copy beside each (replicated) parameter
        tokens, in_flight = cfg.micro_batch * cfg.seq_len, 1
        if cfg.pp > 1:
            chunk = tokens // cfg.pp_microbatches
            in_flight = cfg.pp_microbatches if cfg.pp_schedule == "gpipe" else min(cfg.pp_microbatches, cfg.pp - stage)
            tokens = chunk * in_flight
        dtype_bytes = 4 if cfg.precision == "fp32" else 2
        act = _act_bytes_per_token(cfg, stage, dtype_bytes) * tokens
        if fused_head:
            # the fused head's stored weight gradient, one per pipeline chunk in flight (counted as a gradient
            # above under checkpointing, where it has become one by the peak), and one chunk's logits and softmax
            head_chunk = min(HEAD_CHUNK_ROWS, tokens) * m.vocab_size
            act += (4 * m.vocab_size * m.n_embd * in_flight * (not cfg.activation_checkpointing)
                    + 2 * dtype_bytes * head_chunk)
        if cfg.precision != "fp32":
            # autocast's 16-bit copies of the weights (under FSDP, of the gathered ones), kept to its exit
            act += 2 * (full - (m.vocab_size + m.block_size) * m.n_embd * (stage == 0))
        pred = MemoryPrediction(params, grads, opt, int(act))
        update = update_peak(cfg, stage, n, opt)  # the optimizer's step: activations gone, gradients all there
        for candidate in (pred, update):
            if best is None or candidate.total > best.total:
                best = candidate
    return best


def update_peak(cfg: TrainConfig, stage: int, n: int, opt: int) -> MemoryPrediction:
    """Memory while the optimizer steps (the other candidate for the peak, where gradients outweigh the
    activations freed by then): the parameters, every gradient (sharded as the parameters) and the optimizer
    state, which here also counts the step's transient buffers (its spec's ``transient_bytes``: whole tensors
    gathered under FSDP2/TP, Newton-Schulz iterates)."""
    transient = spec(cfg.optimizer).transient_bytes(stage_view(cfg, stage, n))
    return MemoryPrediction(4 * n, 4 * n, opt + transient, 0)
