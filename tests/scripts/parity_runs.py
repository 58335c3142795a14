"""Run many (layout, optimizer) pairs of one world size in one set of ranks, and write what each computed.

    python tests/scripts/parity_runs.py NPROC OUT_DIR LAYOUT:OPTIMIZER ...

The ranks are forked by llmopt.launch (as ``llmopt.train --dp 2`` starts them): one process group for all
pairs, each pair building its own meshes and model, so a test pays the ranks' start-up once per world size
instead of once per pair. For each pair, rank 0 writes OUT_DIR/<layout>:<optimizer>.pt holding the training
losses and, for one pair per layout, the held-out losses (evals after 0, 2, 4 and 5 steps).

Layouts without pipeline stages train ``tiny`` with two of its four blocks: they treat every block alike
(DDP's buckets, FSDP2's per-block units and their prefetch, TP's per-block plan), so two blocks prove what four
do, and DTensor's per-operator cost (most of these runs' time on CPU) halves. Pipelined layouts keep four, so
that each stage holds more than one block.
"""
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

from layouts import rank_setup
from llmopt.core import cli
from llmopt.core.config import TrainConfig, validate
from llmopt.launch import launch
from llmopt.step import build, evaluate, train_step

COMMON = dict(preset="tiny", global_batch=8, seq_len=32, steps=5, seed=0, eval_every=2, eval_batches=2, device="cpu")
LAYOUTS = {
    "single": {},
    "ddp2": dict(dp=2),
    "fsdp2": dict(dp=2, dp_mode="fsdp"),
    "tp2": dict(tp=2),
    "pp2-gpipe": dict(pp=2, pp_schedule="gpipe"),
    "pp2-1f1b": dict(pp=2, pp_schedule="1f1b"),
    "ddp2xtp2": dict(dp=2, tp=2),
    "fsdp2xtp2": dict(dp=2, tp=2, dp_mode="fsdp"),
    "ddp2xpp2": dict(dp=2, pp=2),
    "fsdp2xpp2": dict(dp=2, pp=2, dp_mode="fsdp"),
    "tp2xpp2": dict(tp=2, pp=2),
    "fsdp2xtp2xpp2": dict(dp=2, tp=2, pp=2, dp_mode="fsdp"),
}
LAYOUTS.update({f"{name}-accum2": dict(kw, grad_accum=2) for name, kw in list(LAYOUTS.items())})


class TwoBlocks(TrainConfig):
    """A config whose model is its preset's with two blocks (no preset is added to llmopt's: the tests share
    one process, and the presets are the README's and the parsers' choices)."""

    @property
    def model_config(self):
        return replace(super().model_config, n_layer=2)


def blocks(layout: str) -> int:
    return 4 if LAYOUTS[layout].get("pp", 1) > 1 else 2


def config(layout: str, optimizer: str, n_blocks: int | None = None) -> TrainConfig:
    """The pair's config, its model with ``n_blocks`` blocks (by default the layout's: ``blocks``)."""
    kind = TrainConfig if (n_blocks or blocks(layout)) == 4 else TwoBlocks
    return validate(kind(**COMMON, optimizer=optimizer, **LAYOUTS[layout]))


def run(cfg: TrainConfig, evals: bool = True) -> dict:
    """The pair's training losses and (with ``evals``) held-out losses."""
    state = build(cfg, torch.device("cpu"))
    out = {"losses": [], "evals": [evaluate(state).item()] if evals else []}
    for s in range(cfg.steps):
        out["losses"].append(train_step(state, s).loss.item())
        if evals and ((s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps):
            out["evals"].append(evaluate(state).item())
    return out


def ranks(argv: list[str]) -> int:
    rank_setup()
    out_dir, pairs = argv[0], argv[1:]
    evaluated = set()
    for pair in pairs:
        layout, optimizer = pair.split(":")
        # evals are forward only: once per layout, after an optimizer whose steps are exact to rounding (Muon's
        # bf16 Newton-Schulz moves the weights by about 1e-5 between layouts, above the evals' tolerance; SOAP
        # scales rounding noise up: tests/test_parity.py)
        evals = layout not in evaluated and optimizer not in ("muon", "soap")
        result = run(config(layout, optimizer), evals=evals)
        evaluated |= {layout} if evals else set()
        if dist.get_rank() == 0:
            torch.save(result, os.path.join(out_dir, f"{pair}.pt"))
    dist.barrier()
    dist.destroy_process_group()  # as llmopt.loop does: a rank that leaves first must not abort the others
    return 0


if __name__ == "__main__":
    cli.exit(launch(int(sys.argv[1]), sys.argv[2:], "cpu", ranks, oom_exit=4))
