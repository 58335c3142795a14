"""The training configuration: one frozen dataclass, and ``validate`` that refuses every bad combination.

Each field is one option in one place: its type and default (the dataclass), its help, choices and range
(``option``'s metadata). The ``llmopt.train`` flags (``--`` + name with ``-`` for ``_``), the config columns
of the harness's results.csv, the matrix TOML keys and the README's flag table all come from these fields:
adding a flag is one edit here plus its behaviour. ``check_field`` refuses a value that is wrong on its own
(a matrix file's values are checked with it before any config is built); ``validate`` then refuses bad
combinations. Every check raises ``ValueError`` with one line that names the flag and the fix; the command
line prints that line and exits 2 (``llmopt.core.cli``).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace

from llmopt.core.shapes import PRESETS, GPTConfig
from llmopt.optimizers import check_installed
from llmopt.optimizers import names as optimizer_names
from llmopt.optimizers import spec as optimizer_spec

MODEL_IMPLS = ("llmopt", "hf")
ENGINES = ("native", "accelerate")
DP_MODES = ("ddp", "fsdp")
PP_SCHEDULES = ("gpipe", "1f1b")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZER_IMPLS = ("auto", "for-loop", "foreach", "fused")  # an optimizer's own (its spec's impls); auto picks
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("constant", "cosine", "linear", "wsd")
CHECKPOINT = "checkpoint"  # the preset of a run whose shape comes from --init


def option(default, help: str, *, choices=None, low=None, high=None, check=None, metavar: str | None = None,
           given_positive: bool = False):
    """A config field: its default, the help line of its flag, and what a single value must be: one of
    ``choices`` (a tuple, or a function giving one), a number in [``low``, ``high``] (floats also finite), or
    whatever ``check(value)`` accepts. ``given_positive``: the default 0 stands for "the default", so a value the
    user gives (a flag, a matrix file) must be above 0."""
    return field(default=default, metadata=dict(help=help, choices=choices, low=low, high=high, check=check,
                                                metavar=metavar, given_positive=given_positive))


def _check_data(value) -> None:
    from llmopt.prepare import BUILTIN

    if value is not None and value not in BUILTIN and not os.path.exists(value):
        raise ValueError(f"--data: no such file or directory {value!r}; pass a text file, a directory, a prepared "
                         f"directory, python-stdlib, or omit --data")


def _check_tokenizer(value) -> None:
    if isinstance(value, str) and value.startswith("train:"):
        from llmopt.prepare import tokenizer_vocab_size

        tokenizer_vocab_size(value)  # N must be a number in range


INIT_KINDS = ("hf:", "ckpt:")  # --init: a Hugging Face GPT-2 (name or directory), or a training checkpoint's model


def init_path(init: str) -> str:
    """The name or path of ``--init KIND:PATH``."""
    return init.split(":", 1)[1]


def _check_init(value) -> None:
    if value is not None and (not str(value).startswith(INIT_KINDS) or not init_path(str(value))):
        raise ValueError(f"--init {value!r}: use hf:NAME_OR_PATH (a Hugging Face GPT-2 name or a local directory) or "
                         f"ckpt:DIR (the model of a training checkpoint, --checkpoint-dir)")


@dataclass(frozen=True)
class TrainConfig:
    engine: str = option("native", "native (llmopt's step) or accelerate (accelerate.Accelerator's loop)",
                         choices=ENGINES)
    model_impl: str = option("llmopt", "llmopt's GPT, or transformers' GPT2LMHeadModel of the same shape",
                             choices=MODEL_IMPLS)
    preset: str = option("tiny", "model size, a key of llmopt.core.shapes.PRESETS",
                         choices=lambda: (*PRESETS, CHECKPOINT))  # read when checked: bench.advise adds shapes
    device: str = option("auto", "auto (cuda when visible), cpu or cuda", choices=DEVICES)
    dp: int = option(1, "data-parallel degree", low=1)
    dp_mode: str = option("ddp", "ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard)", choices=DP_MODES)
    tp: int = option(1, "tensor-parallel degree (Megatron split of attention and MLP)", low=1)
    pp: int = option(1, "pipeline-parallel degree (stages of consecutive blocks)", low=1)
    pp_schedule: str = option("1f1b", "pipeline schedule: gpipe or 1f1b", choices=PP_SCHEDULES)
    pp_microbatches: int = option(0, "pipeline chunks per accumulation micro-batch (0: --pp)", low=0)
    precision: str = option("fp32", "fp32, bf16 (autocast) or fp16 (autocast + loss scaling)", choices=PRECISIONS)
    grad_accum: int = option(1, "accumulation micro-batches per step (the global batch is fixed)", low=1)
    global_batch: int = option(8, "sequences per optimizer step, over all ranks", low=1)
    seq_len: int = option(128, "tokens per sequence", low=1)
    optimizer: str = option("adamw", "the optimizer: one of llmopt.optimizers (README's table; a file of your own "
                                     "through LLMOPT_OPTIMIZERS)", choices=optimizer_names)
    optimizer_impl: str = option("auto", "torch's for-loop, foreach or fused kernels (auto: the fastest that applies)",
                                 choices=OPTIMIZER_IMPLS)
    compile: bool = option(False, "torch.compile each transformer block")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward")
    lr: float = option(0.0, "learning rate (default: the optimizer's default_lr, llmopt.optimizers)", low=0.0,
                       given_positive=True)
    adamw_lr: float = option(0.0, "learning rate of an optimizer's AdamW part (Muon's embeddings, head, LayerNorm "
                                  "gains and biases; 0: --lr)", low=0.0)
    lr_schedule: str = option("constant", "after the warm-up: constant, cosine or linear decay, or wsd (stable, then a "
                                          "linear decay over the last --lr-decay-fraction of the steps)",
                              choices=LR_SCHEDULES)
    lr_warmup: int = option(0, "steps of linear learning-rate warm-up", low=0)
    min_lr_ratio: float = option(0.1, "floor of the cosine/linear/wsd decay, a fraction of --lr", low=0.0, high=1.0)
    lr_decay_fraction: float = option(0.2, "wsd: the fraction of the steps its decay takes (Hagele et al. 2024)",
                                      low=0.0, high=1.0)
    weight_decay: float = option(0.01, "weight decay, on tensors of 2+ dimensions only", low=0.0)
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)", low=0.0)
    steps: int = option(10, "optimizer steps", low=1)
    max_tokens: int = option(0, "budget in tokens instead of --steps (steps = ceil(N / tokens per step); 0: --steps)",
                             low=0)
    seed: int = option(0, "model initialisation and data order", low=0, high=2**63 - 1)
    data: str | None = option(None, "a text file (byte tokens), a prepared directory, a text directory or "
                                    "python-stdlib (prepared on first use); default: generated Markov data",
                              check=_check_data)
    tokenizer: str = option("bytes", "for raw text: bytes, a Hugging Face tokenizer name or path, or train:N",
                            check=_check_tokenizer)
    init: str | None = option(None, "hf:NAME_OR_PATH: start from GPT2LMHeadModel.from_pretrained weights; "
                              "ckpt:DIR: from a training checkpoint's model (what llmopt.export writes)",
                              check=_check_init, metavar="hf:NAME_OR_PATH|ckpt:DIR")
    eval_every: int = option(0, "held-out eval every N steps (and before the first and after the last; 0: none)",
                             low=0)
    eval_batches: int = option(4, "global batches of the held-out split in each eval", low=1)
    target_loss: float = option(0.0, "stop at the first eval at or below this loss, in nats (0: no target)", low=0.0)
    target_gap: float = option(0.0, "... or this far above the generated data's entropy floor (0: no target)",
                               low=0.0)
    gns: bool = option(False, "estimate the gradient noise scale (McCandlish et al. 2018); needs --grad-accum 2+")

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
        steps = -(-self.max_tokens // self.tokens_per_step) if self.max_tokens else self.steps  # ints: exact ceil
        return replace(self, lr=self.lr or optimizer_spec(self.optimizer).default_lr,
                       pp_microbatches=self.pp_microbatches or self.pp,
                       device=resolve_device(self.device), steps=steps)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(world_size=self.world_size, micro_batch=self.micro_batch)
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d, where: str) -> "TrainConfig":
        """The config a JSON object holds (``asdict`` of one: a plan entry's, ``llmopt.train --config``'s), each
        value checked for its field's type, so that a file someone else wrote fails here with one line naming
        ``where`` and the field, not as a TypeError deep in a check. Missing fields take their defaults (a file
        from before a new flag); unknown ones are refused."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: a config is a JSON object of llmopt.train's fields, not a {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{where}: fields llmopt does not have: {', '.join(map(str, unknown))}; remove them")
        for f in fields(cls):
            if f.name in d and not _of_type(d[f.name], str(f.type)):
                raise ValueError(f"{where}: {f.name} is {d[f.name]!r}, not a{'n' if f.type == 'int' else ''} "
                                 f"{f.type}; fix that value")
        return cls(**{k: float(v) if cls.__dataclass_fields__[k].type == "float" else v for k, v in d.items()})


def _of_type(value, kind: str) -> bool:
    """Whether a JSON value can be a field of this annotation (a float field takes an integer, as JSON writes
    1.0; a switch is never a number, nor a number a switch)."""
    if value is None:
        return "None" in kind
    if isinstance(value, bool):
        return kind == "bool"
    if kind.startswith("str"):
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, int | float)
    return False


@functools.lru_cache(maxsize=None)
def checkpoint_config(init: str) -> GPTConfig:
    """The model shape of ``hf:NAME_OR_PATH`` from its config alone (``AutoConfig``: no weights are read), or of
    ``ckpt:DIR`` from the config its run saved (its shape, its data's vocabulary)."""
    _check_init(init)
    if init.startswith("ckpt:"):
        from llmopt.core.checkpoint_files import read_state, resolve

        path = resolve(init_path(init), "--init ckpt:DIR:")
        try:
            return TrainConfig.from_dict(read_state(path)["config"], f"--init {init}").model_config
        except ValueError as e:
            raise ValueError(f"--init {init}: its run's config cannot be built here ({e})") from None
    from transformers import AutoConfig

    from llmopt import hub
    from llmopt.checkpoint import check_weights
    from llmopt.model import config_from_hf

    name = init_path(init)
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


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def choices(name: str) -> tuple | None:
    """The values a field may take, or None where any value of its type may do."""
    c = TrainConfig.__dataclass_fields__[name].metadata.get("choices")
    return tuple(c()) if callable(c) else c


def check_field(name: str, value) -> None:
    """Refuse a value that is wrong on its own (whatever the other fields): one ValueError naming the flag."""
    meta = TrainConfig.__dataclass_fields__[name].metadata
    allowed = choices(name)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{flag(name)}: unknown value {value!r}; choose one of {', '.join(map(str, allowed))}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None or high is not None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(name)} {value}: must be a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            top = "2^63 - 1" if high == 2**63 - 1 else high
            span = f"between {low} and {top}" if high is not None else f"at least {low}"
            raise ValueError(f"{flag(name)} {value}: must be {span}")
    if meta.get("check") is not None:
        meta["check"](value)


def check_given(name: str, value) -> None:
    """``check_field`` for a value the user gave (a flag, a matrix file's value), not a default."""
    check_field(name, value)
    if TrainConfig.__dataclass_fields__[name].metadata.get("given_positive") and not value > 0:
        raise ValueError(f"{flag(name)} {value}: must be above 0 (leave it out for the default)")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Return the resolved config, or raise ValueError naming the flag and the fix. Does no heavy work."""
    for f in fields(cfg):
        check_field(f.name, getattr(cfg, f.name))
    if cfg.preset == CHECKPOINT and cfg.init is None:
        raise ValueError(f"--preset {CHECKPOINT} takes its shape from --init; pass --init hf:NAME_OR_PATH or a preset")
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
    opt = optimizer_spec(cfg.optimizer)
    check_installed(opt)
    if cfg.adamw_lr and not opt.adamw_part:
        parts = [n for n in optimizer_names() if optimizer_spec(n).adamw_part]
        raise ValueError(f"--adamw-lr sets the rate of an optimizer's AdamW part; --optimizer {cfg.optimizer} has "
                         f"none (those that do: {', '.join(parts) or 'none'}); drop --adamw-lr")
    if cfg.optimizer_impl != "auto" and cfg.optimizer_impl not in opt.impls:
        raise ValueError(f"--optimizer-impl {cfg.optimizer_impl}: torch has no such kernels for --optimizer "
                         f"{cfg.optimizer}; use --optimizer-impl auto or {' or '.join(opt.impls)}")
    if opt.lr_schedules is not None and cfg.lr_schedule not in opt.lr_schedules:
        raise ValueError(f"--optimizer {cfg.optimizer} takes --lr-schedule {' or '.join(opt.lr_schedules)}, not "
                         f"{cfg.lr_schedule}; use --lr-schedule {opt.lr_schedules[0]} (warm-up still applies) or "
                         f"another --optimizer")
    if cfg.optimizer_impl == "fused":
        from llmopt.precision import fused_optimizer_ok  # torch: only where fused kernels are asked for

        if not fused_optimizer_ok(cfg.precision, cfg.world_size):
            raise ValueError("--optimizer-impl fused --precision fp16 on several ranks: torch's ShardedGradScaler "
                             "cannot drive fused optimizer kernels (pytorch/pytorch#140514); use --optimizer-impl "
                             "foreach or auto")
    if cfg.engine == "accelerate":
        if cfg.tp > 1 or cfg.pp > 1 or cfg.dp_mode != "ddp":
            raise ValueError("--engine accelerate runs data parallelism (DDP) only; drop --tp/--pp/--dp-mode fsdp "
                             "or use --engine native")
        if not opt.accelerate:
            raise ValueError(f"--engine accelerate takes torch's optimizers, not --optimizer {cfg.optimizer}; use "
                             f"another optimizer, or --engine native")
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
                             f"tokenizer" + (f" (--tokenizer {init_path(cfg.init)})" if cfg.init.startswith("hf:")
                                              else ""))
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
    if cfg.lr_decay_fraction != 0.2 and cfg.lr_schedule != "wsd":
        raise ValueError(f"--lr-decay-fraction {cfg.lr_decay_fraction} shapes --lr-schedule wsd only; add "
                         f"--lr-schedule wsd or drop it")
    if cfg.lr_schedule == "wsd" and (cfg.lr_decay_fraction <= 0 or round(cfg.lr_decay_fraction * steps) < 1):
        raise ValueError(f"--lr-decay-fraction {cfg.lr_decay_fraction} of {steps} steps leaves wsd no decay step; "
                         f"use a larger fraction or more steps")
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
