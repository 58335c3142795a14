"""The training configuration: one frozen dataclass, and ``validate`` that refuses every bad combination.

Field names are the CLI flags with ``-`` -> ``_`` and the CSV columns of the harness: one name per thing.
Every check raises ``ValueError`` with one line that names the flag and the fix; the CLI prints that line
and exits 2 (see ``llmopt.train``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace

from llmopt.model import PRESETS, GPTConfig

MODEL_IMPLS = ("llmopt", "hf")
ENGINES = ("native", "accelerate")
DP_MODES = ("ddp", "fsdp")
PP_SCHEDULES = ("gpipe", "1f1b")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adam", "adamw", "lamb")
OPTIMIZER_IMPLS = ("auto", "for-loop", "foreach", "fused")
DEVICES = ("auto", "cpu", "cuda")

# Learning rates that make each optimizer's loss fall quickly on the tiny preset; --lr overrides.
DEFAULT_LR = {"sgd": 0.1, "adam": 3e-3, "adamw": 3e-3, "lamb": 1e-2}


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"             # model size, a key of llmopt.model.PRESETS
    model_impl: str = "llmopt"       # llmopt's GPT, or transformers' GPT2LMHeadModel of the same shape
    dp: int = 1                      # data-parallel degree
    dp_mode: str = "ddp"             # ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard)
    tp: int = 1                      # tensor-parallel degree (Megatron split of attention and MLP)
    pp: int = 1                      # pipeline-parallel degree (stages of consecutive blocks)
    pp_schedule: str = "1f1b"        # gpipe or 1f1b
    pp_microbatches: int = 0         # pipeline chunks per accumulation micro-batch; 0 -> pp
    precision: str = "fp32"          # fp32, bf16 (autocast) or fp16 (autocast + GradScaler)
    grad_accum: int = 1              # accumulation micro-batches per step (global batch fixed)
    global_batch: int = 8            # sequences per optimizer step, over all ranks
    seq_len: int = 128               # tokens per sequence
    optimizer: str = "adamw"         # sgd, adam, adamw or lamb
    optimizer_impl: str = "auto"     # torch's for-loop, foreach or fused kernels (auto: the fastest that applies)
    lr: float = 0.0                  # learning rate; 0 -> DEFAULT_LR[optimizer]
    weight_decay: float = 0.01       # on tensors of 2+ dimensions only
    max_grad_norm: float = 1.0       # clip the global gradient norm; 0 disables
    steps: int = 10                  # optimizer steps
    seed: int = 0                    # model init and data
    device: str = "auto"             # auto, cpu or cuda
    data: str | None = None          # a text file (byte tokens); None -> the generated Markov source
    engine: str = "native"           # native (llmopt's step) or accelerate (accelerate.Accelerator's loop)
    compile: bool = False            # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block's activations in backward

    # ------------------------------------------------------------------ derived
    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def micro_batch(self) -> int:
        """Sequences per rank per accumulation micro-batch."""
        return self.global_batch // (self.dp * self.grad_accum)

    @property
    def model_config(self) -> GPTConfig:
        cfg = PRESETS[self.preset]
        if self.data is not None:
            cfg = replace(cfg, vocab_size=256)  # byte-level tokens
        return cfg

    def resolved(self) -> "TrainConfig":
        """Fill the 0-means-default fields (learning rate, pipeline chunks, device)."""
        return replace(self, lr=self.lr or DEFAULT_LR[self.optimizer],
                       pp_microbatches=self.pp_microbatches or self.pp,
                       device=resolve_device(self.device))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(world_size=self.world_size, micro_batch=self.micro_batch)
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _choice(flag: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"--{flag}: unknown value {value!r}; choose one of {', '.join(map(str, allowed))}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Return the resolved config, or raise ValueError naming the flag and the fix. Does no heavy work."""
    _choice("preset", cfg.preset, PRESETS)
    _choice("model-impl", cfg.model_impl, MODEL_IMPLS)
    _choice("dp-mode", cfg.dp_mode, DP_MODES)
    _choice("pp-schedule", cfg.pp_schedule, PP_SCHEDULES)
    _choice("precision", cfg.precision, PRECISIONS)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("optimizer-impl", cfg.optimizer_impl, OPTIMIZER_IMPLS)
    _choice("device", cfg.device, DEVICES)
    _choice("engine", cfg.engine, ENGINES)
    for flag in ("dp", "tp", "pp", "grad_accum", "global_batch", "seq_len", "steps"):
        if getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: must be at least 1")
    if cfg.pp_microbatches < 0:
        raise ValueError(f"--pp-microbatches {cfg.pp_microbatches}: must be at least 1 (or 0 for --pp)")
    if cfg.lr < 0:
        raise ValueError(f"--lr {cfg.lr}: must be positive (or 0 for the optimizer's default)")
    if cfg.weight_decay < 0:
        raise ValueError(f"--weight-decay {cfg.weight_decay}: must be 0 or positive")
    if cfg.max_grad_norm < 0:
        raise ValueError(f"--max-grad-norm {cfg.max_grad_norm}: must be positive, or 0 to disable clipping")
    if cfg.data is not None and not os.path.isfile(cfg.data):
        raise ValueError(f"--data: no such file {cfg.data!r}; pass an existing text file or omit --data")

    m = cfg.model_config
    if cfg.seq_len > m.block_size:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the {cfg.preset} preset's {m.block_size} positions; "
                         f"use --seq-len {m.block_size} or less")
    per = cfg.dp * cfg.grad_accum
    if cfg.global_batch % per:
        raise ValueError(f"--global-batch {cfg.global_batch} is not divisible by --dp x --grad-accum = {per}; "
                         f"use a multiple of {per}")
    if cfg.tp > 1 and (m.n_head % cfg.tp):
        raise ValueError(f"--tp {cfg.tp} does not divide the {m.n_head} attention heads of preset {cfg.preset}; "
                         f"use a divisor of {m.n_head}")
    if cfg.pp > m.n_layer:
        raise ValueError(f"--pp {cfg.pp} is more than the {m.n_layer} layers of preset {cfg.preset}; "
                         f"use --pp {m.n_layer} or less")
    chunks = cfg.pp_microbatches or cfg.pp
    if cfg.pp > 1 and cfg.micro_batch % chunks:
        raise ValueError(f"--pp-microbatches {chunks} does not divide the micro-batch of {cfg.micro_batch} "
                         f"sequences (--global-batch / --dp / --grad-accum); use a divisor of {cfg.micro_batch}")
    if cfg.model_impl == "hf" and (cfg.tp > 1 or cfg.pp > 1):
        raise ValueError("--model-impl hf supports data parallelism only; use --model-impl llmopt with --tp/--pp")
    if cfg.optimizer_impl in ("foreach", "fused") and cfg.optimizer == "lamb":
        raise ValueError(f"--optimizer-impl {cfg.optimizer_impl}: llmopt's LAMB is a for-loop; "
                         f"use --optimizer-impl auto or for-loop with --optimizer lamb")
    if cfg.engine == "accelerate":
        if cfg.tp > 1 or cfg.pp > 1 or cfg.dp_mode != "ddp":
            raise ValueError("--engine accelerate runs data parallelism (DDP) only; drop --tp/--pp/--dp-mode fsdp "
                             "or use --engine native")
        if cfg.optimizer == "lamb":
            raise ValueError("--engine accelerate takes torch's optimizers; use sgd, adam or adamw, or --engine native")
        if cfg.precision == "fp16" and resolve_device(cfg.device) == "cpu":
            raise ValueError("--engine accelerate --precision fp16: Accelerate applies fp16 on GPUs only (on CPU it "
                             "silently trains in fp32); use --precision bf16 or --engine native")
    return cfg.resolved()
