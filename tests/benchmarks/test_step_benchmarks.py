"""pytest-benchmark suite: the training step under each toggle family.

``pytest --benchmark-only`` times them (``benchmark.pedantic`` with warm-up rounds); a plain ``pytest`` runs
each once as a test without timing. ``extra_info`` carries tokens_per_s, peak_memory_bytes (tracked tensor
memory of one extra step) and mfu (against the measured fp32/bf16/fp16 matmul peak of this machine).
"""
import itertools
import json
import math

import pytest
import torch

from bench.hardware import peak_flops
from llmopt.core.config import TrainConfig, validate
from llmopt.core.shapes import flops_per_token
from llmopt.instruments import mfu, tracked_memory_step
from llmopt.step import build, train_step

SHAPE = dict(preset="tiny", global_batch=8, seq_len=64)
ROUNDS, WARMUP = 6, 2
CASES = [
    ("precision", {"precision": "fp32"}),
    ("precision", {"precision": "bf16"}),
    ("precision", {"precision": "fp16"}),
    ("grad_accum", {"grad_accum": 1}),
    ("grad_accum", {"grad_accum": 4}),
    ("optimizer", {"optimizer": "sgd"}),
    ("optimizer", {"optimizer": "adam"}),
    ("optimizer", {"optimizer": "adamw"}),
    ("optimizer", {"optimizer": "lamb"}),
    ("speed", {"compile": True}),
    ("speed", {"activation_checkpointing": True}),
]
_PEAKS: dict = {}


def _positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _record(benchmark, cfg, tokens_per_s, peak_bytes):
    mc = cfg.model_config
    peak, source = peak_flops("cpu", cfg.precision, _PEAKS, mc.n_embd, mc.vocab_size, cfg.micro_batch * cfg.seq_len)
    info = {"tokens_per_s": tokens_per_s, "peak_memory_bytes": peak_bytes,
            "mfu": mfu(tokens_per_s, flops_per_token(mc, cfg.seq_len), peak)}
    for name, value in info.items():
        assert _positive(value), f"{name} = {value}: a benchmark must record a positive, finite figure"
    assert info["mfu"] <= 1, f"MFU {info['mfu']:.2f} > 100%: the peak ({source}) is not an upper bound"
    benchmark.extra_info.update(info, peak_flops_source=source)


def _case_id(family, overrides):
    return "-".join([family] + [k if v is True else str(v) for k, v in overrides.items()])


@pytest.mark.parametrize("family,overrides", CASES, ids=[_case_id(f, o) for f, o in CASES])
def test_step(benchmark, family, overrides):
    benchmark.group = family
    cfg = validate(TrainConfig(**SHAPE, **overrides))
    state = build(cfg, torch.device("cpu"))
    steps = itertools.count()
    losses = []

    def one_step():
        losses.append(train_step(state, next(steps)).loss.item())  # .item(): the step's work is finished

    benchmark.pedantic(one_step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert all(map(math.isfinite, losses)), losses
    if benchmark.stats is not None:  # timed run (--benchmark-only): warm-up + rounds steps, so it must train
        assert losses[-1] < losses[0], losses
        tokens = cfg.global_batch * cfg.seq_len
        _record(benchmark, cfg, tokens / benchmark.stats.stats.mean,
                tracked_memory_step(state, lambda: train_step(state, next(steps)))["total"])


def test_layout_ddp2(benchmark, cli, tmp_path):
    """A multi-rank layout: the ranks run in their own processes, so the benchmark times the whole run
    (launch included) and extra_info takes the in-run figures (warm-up excluded) from its metrics JSON."""
    benchmark.group = "layout"
    out = tmp_path / "m.json"
    args = ["-m", "llmopt.train", "--dp", "2", "--steps", "6", "--timing-warmup", "2", "--quiet",
            "--memory-breakdown", "--metrics-out", str(out)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SHAPE.items()]

    def run():
        r = cli(*args)
        assert r.returncode == 0, r.stderr[-2000:]

    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    m = json.loads(out.read_text())
    assert len(m["losses"]) == 6 and m["losses"][-1] < m["losses"][0]
    assert len(m["peak_memory_bytes_per_rank"]) == 2
    if benchmark.stats is not None:
        _record(benchmark, validate(TrainConfig(**SHAPE, dp=2)), m["tokens_per_s"], m["peak_memory_bytes"])


# ---------------------------------------------------------------- peers, at the CPU speed target's shape
PEER_SHAPE = dict(preset="mini", global_batch=8, seq_len=256, optimizer="adamw", lr=1e-3)  # 3e-3 spikes early here


@pytest.mark.parametrize("impl", ["llmopt-step", "llmopt-step-compiled", "hf-user-loop"])
def test_peer(benchmark, impl):
    """The compiled case times llmopt's step with --compile at the peers' shape (warm-up round = compile)."""
    benchmark.group = "peers (mini: 4 layers, width 256, seq 256, vocab 8192, batch 8, AdamW)"
    cfg = validate(TrainConfig(**PEER_SHAPE, compile=impl.endswith("compiled")))
    if impl == "hf-user-loop":
        from bench.targets import hf_user_loop

        step, steps = hf_user_loop(cfg), itertools.count()

        def one_step():
            return step(next(steps))
    else:
        state = build(cfg, torch.device("cpu"))
        steps = itertools.count()

        def one_step():
            return train_step(state, next(steps)).loss.item()

    losses = []
    benchmark.pedantic(lambda: losses.append(one_step()), rounds=4, warmup_rounds=1, iterations=1)
    assert all(map(math.isfinite, losses)), losses
    if benchmark.stats is not None:
        assert losses[-1] < losses[0], losses
        tokens_per_s = cfg.global_batch * cfg.seq_len / benchmark.stats.stats.mean
        assert _positive(tokens_per_s)
        benchmark.extra_info["tokens_per_s"] = tokens_per_s
