"""The training configuration: one frozen dataclass, and ``validate`` that refuses every bad combination.

Field names are the CLI flags with ``-`` -> ``_`` and the CSV columns of the harness: one name per thing.
Every check raises ``ValueError`` with one line that names the flag and the fix; the CLI prints that line
and exits 2 (see ``llmopt.train``).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass, fields, replace

from llmopt.model import PRESETS, GPTConfig
from llmopt.precision import fused_optimizer_ok

MODEL_IMPLS = ("llmopt", "hf")
ENGINES = ("native", "accelerate")
DP_MODES = ("ddp", "fsdp")
PP_SCHEDULES = ("gpipe", "1f1b")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adam", "adamw", "lamb")
OPTIMIZER_IMPLS = ("auto", "for-loop", "foreach", "fused")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("constant", "cosine", "linear")

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
    data: str | None = None          # None: the generated Markov source; a text file (bytes), a prepared
                                     # directory, a text directory or python-stdlib (prepared on first use)
    tokenizer: str = "bytes"         # for raw text: bytes, a Hugging Face tokenizer name/path, or train:N
    init: str | None = None          # hf:NAME_OR_PATH: start from GPT2LMHeadModel.from_pretrained weights
    engine: str = "native"           # native (llmopt's step) or accelerate (accelerate.Accelerator's loop)
    compile: bool = False            # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    lr_schedule: str = "constant"    # constant, cosine or linear decay after the warm-up (llmopt.optim.lr_factor)
    lr_warmup: int = 0               # steps of linear learning-rate warm-up
    min_lr_ratio: float = 0.1        # floor of the cosine/linear decay, as a fraction of --lr
    max_tokens: int = 0              # budget in tokens instead of --steps (steps = ceil(max_tokens / tokens per step))
    eval_every: int = 0              # held-out eval every N steps (and before the first and after the last); 0: none
    eval_batches: int = 4            # global batches of the held-out split in each eval
    target_loss: float = 0.0         # stop at the first eval at or below this loss (nats); 0: no target
    target_gap: float = 0.0          # ... or this far above the generated data's entropy floor; 0: no target
    gns: bool = False                # estimate the gradient noise scale (McCandlish et al. 2018); needs grad_accum >= 2

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
        """The preset's shape, or the checkpoint's with --init; the vocabulary is the data's."""
        if self.init is not None:
            return checkpoint_config(self.init)
        cfg = PRESETS[self.preset]
        if self.data is not None:
            cfg = replace(cfg, vocab_size=data_vocab_size(self.data, self.tokenizer))
        return cfg

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def resolved(self) -> "TrainConfig":
        """Fill the 0-means-default fields (learning rate, pipeline chunks, device) and turn a token budget
        into steps."""
        steps = math.ceil(self.max_tokens / self.tokens_per_step) if self.max_tokens else self.steps
        return replace(self, lr=self.lr or DEFAULT_LR[self.optimizer],
                       pp_microbatches=self.pp_microbatches or self.pp,
                       device=resolve_device(self.device), steps=steps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(world_size=self.world_size, micro_batch=self.micro_batch)
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


CHECKPOINT = "checkpoint"  # the preset of a run whose shape comes from --init


@functools.lru_cache(maxsize=None)
def checkpoint_config(init: str) -> GPTConfig:
    """The model shape of ``hf:NAME_OR_PATH`` from its config alone (``AutoConfig``: no weights are read)."""
    from transformers import AutoConfig

    from llmopt.model import config_from_hf

    if not init.startswith("hf:") or len(init) == 3:
        raise ValueError(f"--init {init!r}: use hf:NAME_OR_PATH (a Hugging Face GPT-2 name or a local directory)")
    from llmopt import hub
    from llmopt.checkpoint import check_weights

    name = init[3:]
    hf = hub.load(AutoConfig.from_pretrained, name, f"--init {init}")
    if getattr(hf, "model_type", None) != "gpt2":
        raise ValueError(f"--init {init}: a {getattr(hf, 'model_type', '?')} checkpoint; llmopt trains GPT-2 models")
    try:
        cfg = config_from_hf(hf)
        if os.path.isdir(name):  # a local directory's weights are checked now, from their headers; a hub name's
            check_weights(name, hf)  # when they are loaded (llmopt.checkpoint.load_gpt2)
    except ValueError as e:
        raise ValueError(f"--init {init}: {e}") from None
    return cfg


def data_vocab_size(data: str, tokenizer: str) -> int:
    """The vocabulary of ``--data``, without tokenizing anything: a prepared directory's (its meta.json), or
    the cache's prepared copy of raw text; raw text not prepared yet gets the tokenizer's (for ``train:N`` an
    upper bound: ``llmopt.train`` prepares before it validates, so a run always sees the prepared vocabulary)."""
    from llmopt.data import is_prepared, read_meta
    from llmopt.prepare import BUILTIN, cached_path, tokenizer_vocab_size

    if is_prepared(data):
        return int(read_meta(data)["vocab_size"])
    if data not in BUILTIN and not os.path.exists(data):
        raise ValueError(f"--data: no such file or directory {data!r}; pass a text file, a directory, a prepared "
                         f"directory, python-stdlib, or omit --data")
    if os.path.exists(data) and not (os.path.isfile(data) or os.path.isdir(data)):
        raise ValueError(f"--data {data!r} is not a regular file or directory; pass a text file or a directory")
    if not (os.path.isfile(data) and tokenizer == "bytes"):
        cached = cached_path(data, tokenizer)
        if is_prepared(cached):
            return int(read_meta(cached)["vocab_size"])
    return tokenizer_vocab_size(tokenizer)


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
    if cfg.preset == CHECKPOINT and cfg.init is None:
        raise ValueError(f"--preset {CHECKPOINT} takes its shape from --init; pass --init hf:NAME_OR_PATH or a preset")
    if cfg.preset != CHECKPOINT:
        _choice("preset", cfg.preset, PRESETS)
    _choice("model-impl", cfg.model_impl, MODEL_IMPLS)
    _choice("dp-mode", cfg.dp_mode, DP_MODES)
    _choice("pp-schedule", cfg.pp_schedule, PP_SCHEDULES)
    _choice("precision", cfg.precision, PRECISIONS)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("optimizer-impl", cfg.optimizer_impl, OPTIMIZER_IMPLS)
    _choice("device", cfg.device, DEVICES)
    _choice("engine", cfg.engine, ENGINES)
    _choice("lr-schedule", cfg.lr_schedule, LR_SCHEDULES)
    for flag in ("dp", "tp", "pp", "grad_accum", "global_batch", "seq_len", "steps", "eval_batches"):
        if getattr(cfg, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: must be at least 1")
    for flag in ("pp_microbatches", "lr_warmup", "max_tokens", "eval_every"):
        if getattr(cfg, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: must be 0 or more")
    if not 0 <= cfg.seed < 2**63:
        raise ValueError(f"--seed {cfg.seed}: must be between 0 and 2^63 - 1")
    for flag in ("lr", "weight_decay", "max_grad_norm", "min_lr_ratio", "target_loss", "target_gap"):
        v = getattr(cfg, flag)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"--{flag.replace('_', '-')} {v}: must be a finite number, 0 or more")
    if cfg.min_lr_ratio > 1:
        raise ValueError(f"--min-lr-ratio {cfg.min_lr_ratio}: must be between 0 and 1 (a fraction of --lr)")
    _check_training_schedule(cfg)
    m = cfg.model_config
    _check_init_and_data(cfg, m)
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
    if cfg.optimizer_impl == "fused" and not fused_optimizer_ok(cfg.precision, cfg.world_size):
        raise ValueError("--optimizer-impl fused --precision fp16 on several ranks: torch's ShardedGradScaler "
                         "cannot drive fused optimizer kernels (pytorch/pytorch#140514); use --optimizer-impl "
                         "foreach or auto")
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


def _check_init_and_data(cfg: TrainConfig, m: GPTConfig) -> None:
    if cfg.init is not None:
        if cfg.preset != CHECKPOINT:
            p = PRESETS[cfg.preset]
            shape = lambda c: (c.n_layer, c.n_head, c.n_embd)  # noqa: E731
            if shape(p) != shape(m):
                raise ValueError(f"--preset {cfg.preset} {shape(p)} disagrees with --init {cfg.init} "
                                 f"(layers, heads, width {shape(m)}); drop --preset: the checkpoint sets the shape")
        if cfg.data is not None and data_vocab_size(cfg.data, cfg.tokenizer) != m.vocab_size:
            raise ValueError(f"--init {cfg.init} has a vocabulary of {m.vocab_size} but --data {cfg.data} has "
                             f"{data_vocab_size(cfg.data, cfg.tokenizer)}; prepare the data with the checkpoint's "
                             f"tokenizer (--tokenizer {cfg.init[3:]})")
    elif cfg.data is not None:
        data_vocab_size(cfg.data, cfg.tokenizer)  # raises on a missing or malformed --data
    if cfg.data is not None and os.path.isfile(cfg.data) and cfg.tokenizer == "bytes":
        from llmopt.data import TextFileSource

        size = os.path.getsize(cfg.data)
        val = int(size * TextFileSource.val_fraction)
        if min(size - val, val if cfg.eval_every else size) < cfg.seq_len + 2:
            raise ValueError(f"--data {cfg.data!r} has {size} bytes: too short for --seq-len {cfg.seq_len} "
                             f"(each split needs seq_len + 2 bytes; 10% is held out); use a longer file or a "
                             f"smaller --seq-len")


def _check_training_schedule(cfg: TrainConfig) -> None:
    """Warm-up, evals, targets and the noise-scale estimate: the convergence features."""
    steps = cfg.resolved().steps if cfg.max_tokens else cfg.steps
    if cfg.lr_warmup >= steps and cfg.lr_warmup:
        raise ValueError(f"--lr-warmup {cfg.lr_warmup} is not shorter than the run ({steps} steps); "
                         f"use fewer warm-up steps or more --steps/--max-tokens")
    if cfg.target_loss and cfg.target_gap:
        raise ValueError("--target-loss and --target-gap both given; pass one of them")
    if (cfg.target_loss or cfg.target_gap) and not cfg.eval_every:
        raise ValueError("--target-loss/--target-gap are checked at evals; add --eval-every N")
    if cfg.target_gap and cfg.data is not None:
        raise ValueError("--target-gap needs the generated data's known entropy floor; with --data use --target-loss")
    if cfg.gns:
        if cfg.grad_accum < 2:
            raise ValueError("--gns compares one micro-batch's gradient with the step's; use --grad-accum 2 or more")
        if cfg.dp > 1 and (cfg.dp_mode == "fsdp" or cfg.tp > 1 or cfg.pp > 1):
            raise ValueError("--gns with --dp > 1 needs DistributedDataParallel (--dp-mode ddp, no --tp/--pp): "
                             "FSDP2 and replicate keep a micro-batch's gradient inside their own buffers")
        if cfg.pp > 1:
            raise ValueError("--gns with --pp: the tied embedding's gradient is only summed over stages at the end "
                             "of the step; estimate the noise scale without pipeline parallelism")
        if cfg.precision == "fp16" or cfg.engine != "native":
            raise ValueError("--gns runs on the native engine in fp32 or bf16; drop --precision fp16 / --engine")
