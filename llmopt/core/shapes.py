"""A model's shape (``GPTConfig``), the named ones (``PRESETS``) and the arithmetic on a shape (parameters,
FLOPs per token, what each pipeline stage holds), apart from the model so that what only reads shapes (the
config and its checks, the command lines' errors, the optimizers' memory formulas, the advisor's cost model, the
harness's report) needs no torch: a mistake in a flag is reported before torch would have finished importing."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 4          # transformer blocks
    n_head: int = 4           # attention heads per block
    n_embd: int = 128         # model width C; the MLP is 4C wide
    vocab_size: int = 1024    # tokens; the generated data uses the same vocabulary
    block_size: int = 256     # longest sequence (number of learned positions)
    layer_norm_epsilon: float = 1e-5  # GPT-2's value

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# Named presets. `tiny` is the CPU default: layers and heads divisible by 2 and 4 so every layout fits.
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=1024, block_size=256),
    # `tiny` over 256 tokens: the convergence matrices' model (a quarter of the transitions to learn)
    "tiny-v256": GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=256, block_size=256),
    # `tiny` at half the width: a quarter of its non-embedding parameters (the real-text matrix's smaller model)
    "nano": GPTConfig(n_layer=4, n_head=4, n_embd=64, vocab_size=1024, block_size=256),
    # the horizon reference's model: 2 layers of width 48 over a 512-token vocabulary, 87k parameters, so that a
    # study at 20 tokens per parameter fits a 2-core machine (results/README.md, "Does the ranking hold...")
    "pico": GPTConfig(n_layer=2, n_head=4, n_embd=48, vocab_size=512, block_size=128),
    # the CPU speed target's shape: 4 layers, 4 heads, width 256, vocabulary 8192, sequences of 256
    "mini": GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=8192, block_size=256),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, block_size=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280, vocab_size=50257, block_size=1024),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024),
}


def param_count(cfg: GPTConfig, non_embedding: bool = False) -> int:
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    per_block = (2 * 2 * C) + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    n = L * per_block + 2 * C  # blocks + ln_f
    if not non_embedding:
        n += V * C + cfg.block_size * C
    return n


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token, the PaLM convention (Chowdhery et al. 2022, appendix B):
    6N + 12·L·H·Q·T, where N is the non-embedding parameter count plus the output head (V·C: the tied head
    is a real matmul), L layers, H heads, Q head size and T the sequence length. Forward is a third."""
    N = param_count(cfg, non_embedding=True) + cfg.vocab_size * cfg.n_embd
    return 6 * N + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def stage_layers(n_layer: int, n_stages: int, stage: int) -> range:
    """Consecutive blocks for ``stage``; earlier stages take the remainder (they also hold no head)."""
    base, extra = divmod(n_layer, n_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def stage_params(cfg, stage: int) -> int:
    """Parameter values held by one rank of pipeline stage ``stage`` (TP shards counted per rank)."""
    m, tp = cfg.model_config, cfg.tp
    C, V = m.n_embd, m.vocab_size
    sharded = 3 * C * C + 3 * C + C * C + 4 * C * C + 4 * C + 4 * C * C  # the four projections, col biases
    replicated = 4 * C + C + C  # two LayerNorms, the two row-parallel biases
    n = len(stage_layers(m.n_layer, cfg.pp, stage)) * (sharded // tp + replicated)
    if stage == 0:
        n += V * C + m.block_size * C
    if stage == cfg.pp - 1:
        n += 2 * C + (V * C if cfg.pp > 1 else 0)  # ln_f, and the head's copy of the embedding
    return n


def stage_tensors(cfg, stage: int) -> list[tuple[int, ...]]:
    """The whole (unsharded) shape of every parameter tensor of pipeline stage ``stage`` (the tied head once), in
    the model's parameter order (embeddings, blocks, final LayerNorm): the order optimizers bucket them in."""
    return [shape for shape, _ in _stage_tensors(cfg, stage)]


def tp_split(cfg, stage: int) -> list[int | None]:
    """For each of ``stage_tensors``, the dimension tensor parallelism shards it along (Megatron's column-
    parallel QKV and MLP-in weights and biases: 0; the row-parallel projections: 1), or None where it is
    replicated (embeddings, LayerNorms, the row-parallel biases)."""
    return [split for _, split in _stage_tensors(cfg, stage)]


def _stage_tensors(cfg, stage: int) -> list[tuple[tuple[int, ...], int | None]]:
    m = cfg.model_config
    C, V = m.n_embd, m.vocab_size
    block = [((C,), None), ((C,), None),                               # ln_1
             ((3 * C, C), 0), ((3 * C,), 0), ((C, C), 1), ((C,), None),  # attn: c_attn, c_proj
             ((C,), None), ((C,), None),                               # ln_2
             ((4 * C, C), 0), ((4 * C,), 0), ((C, 4 * C), 1), ((C,), None)]  # mlp: c_fc, c_proj
    out = [((V, C), None), ((m.block_size, C), None)] if stage == 0 else []
    out += block * len(stage_layers(m.n_layer, cfg.pp, stage))
    if stage == cfg.pp - 1:
        out += [((C,), None), ((C,), None)] + ([((V, C), None)] if cfg.pp > 1 else [])
    return out


def hidden_matrix_params(cfg, stage: int) -> int:
    """Values of the attention and MLP weight matrices (what Muon updates) on one rank of ``stage`` (TP shards
    counted per rank, FSDP shards not)."""
    C = cfg.model_config.n_embd
    return len(stage_layers(cfg.model_config.n_layer, cfg.pp, stage)) * 12 * C * C // cfg.tp


def stage_matrices(cfg, stage: int) -> list[tuple[int, int]]:
    """The whole shapes of the hidden matrices (attention and MLP projections, what Muon updates) of pipeline
    stage ``stage``."""
    C = cfg.model_config.n_embd
    return [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * len(stage_layers(cfg.model_config.n_layer, cfg.pp, stage))
