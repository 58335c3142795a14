"""Save checkpoints under some layouts, or resume them under others, many cases in one set of ranks.

    python tests/scripts/resume_runs.py NPROC OUT_DIR save|resume CASE ...

A CASE is ``SAVE_LAYOUT>RESUME_LAYOUT:OPTIMIZER[:PRECISION]`` (layouts by tests/scripts/parity_runs.py's
names). ``save`` runs the cases whose save layout has NPROC ranks: SAVE_STEPS steps of a STEPS-step run
(``llmopt.dcp.Saver``, as ``llmopt.train --checkpoint-dir`` writes it) into OUT_DIR/<case>/. ``resume`` runs
the cases whose resume layout has NPROC ranks: loads that checkpoint (``llmopt.dcp.load``, as
``--resume-from``) and trains the rest. Rank 0 writes OUT_DIR/<case>.<mode>.pt: the losses (the resumed run's
whole curve, the checkpoint's steps included), the loss scaler's scale when there is one, and the state's
``digest`` as saved and as loaded.
"""
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

from layouts import rank_setup
from llmopt.convergence import Convergence
from llmopt.core import cli
from llmopt.core.config import TrainConfig, validate
from llmopt.dcp import KERNEL_CHOICES, Saver, group_settings, load, step_dir, tensors
from llmopt.launch import launch
from llmopt.loop import Timed
from llmopt.optimizers import spec as optimizer_spec
from llmopt.step import build, train_step
from parity_runs import LAYOUTS, TwoBlocks

STEPS, SAVE_STEPS = 4, 2
# nano with two blocks (parity_runs.TwoBlocks): a pipeline's stages hold one block each; DTensor's per-operator
# cost, most of these runs' time, halves
COMMON = dict(preset="nano", global_batch=8, seq_len=16, steps=STEPS, seed=0, device="cpu", lr_schedule="cosine",
              lr_warmup=1)


def parse(case: str) -> tuple[str, str, str, str]:
    layouts, optimizer, *precision = case.split(":")
    save, resume = layouts.split(">")
    return save, resume, optimizer, (precision or ["fp32"])[0]


def config(layout: str, optimizer: str, precision: str = "fp32") -> TrainConfig:
    """The case's config: a cosine schedule, so that the schedule's state is resumed too (Schedule-Free AdamW
    takes its one schedule, constant)."""
    schedules = optimizer_spec(optimizer).lr_schedules
    kw = dict(COMMON, lr_schedule=schedules[0]) if schedules and COMMON["lr_schedule"] not in schedules else COMMON
    return validate(TwoBlocks(**kw, optimizer=optimizer, precision=precision, **LAYOUTS[layout]))


def digest(state) -> dict:
    """Every tensor of the checkpoint's state (``llmopt.dcp.tensors``: model and optimizer, by layout-free name)
    as the whole tensor's float64 sum and sum of absolute values, and each parameter group's settings and
    counters (but the run's kernel choices), merged over the ranks. The same state under any layout has the same
    digest, exactly (a DTensor is made whole before it is summed)."""
    from torch.distributed.tensor import DTensor

    local = {}
    for name, t in sorted(tensors(state).items()):
        whole = (t.full_tensor() if isinstance(t, DTensor) else t).double()
        local[name] = (whole.sum().item(), whole.abs().sum().item())
    for i, group in enumerate(group_settings(state.optimizer)):  # counters too (SOAP's step, schedule-free's k)
        local[f"group/{i}"] = {k: v for k, v in sorted(group.items()) if k not in KERNEL_CHOICES}
    merged = [None] * dist.get_world_size()
    dist.all_gather_object(merged, local)
    return {k: v for part in merged for k, v in part.items()}


def _scale(state):
    return state.scaler.get_scale() if state.scaler is not None else None


def save(cfg: TrainConfig, out: str) -> dict:
    state = build(cfg, torch.device("cpu"))
    timed = Timed(warmup=0, conv=Convergence(cfg, None))
    for s in range(SAVE_STEPS):
        stats = train_step(state, s)
        timed.losses.append(stats.loss.item())
        timed.grad_norms.append(stats.grad_norm.item())
        timed.step_ms.append(0.0)
        timed.optimizer_ms.append(0.0)
    Saver(out, every=SAVE_STEPS, keep=1, rank=dist.get_rank()).save(state, SAVE_STEPS, timed)
    return {"losses": timed.losses, "scale": _scale(state), "digest": digest(state)}


def resume(cfg: TrainConfig, out: str) -> dict:
    state = build(cfg, torch.device("cpu"))
    timed = Timed(warmup=0, conv=Convergence(cfg, None))
    start = load(state, step_dir(out, SAVE_STEPS), timed)
    scale, loaded = _scale(state), digest(state)
    for s in range(start, cfg.steps):
        timed.losses.append(train_step(state, s).loss.item())
    return {"losses": timed.losses, "scale_loaded": scale, "digest": loaded}


def ranks(argv: list[str]) -> int:
    rank_setup()
    out_dir, mode, cases = argv[0], argv[1], argv[2:]
    for case in cases:
        save_layout, resume_layout, optimizer, precision = parse(case)
        layout = save_layout if mode == "save" else resume_layout
        cfg = config(layout, optimizer, precision)
        if cfg.world_size != dist.get_world_size():
            continue
        where = os.path.join(out_dir, case.replace(">", "-to-").replace(":", "-"))
        result = (save if mode == "save" else resume)(cfg, where)
        if dist.get_rank() == 0:
            torch.save(result, f"{where}.{mode}.pt")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def reference(optimizer: str, precision: str = "fp32", **fields) -> list[float]:
    """The uninterrupted single-process run's losses."""
    cfg = replace(config("single", optimizer, precision), **fields)
    state = build(cfg, torch.device("cpu"))
    return [train_step(state, s).loss.item() for s in range(cfg.steps)]


if __name__ == "__main__":
    cli.exit(launch(int(sys.argv[1]), sys.argv[2:], "cpu", ranks, oom_exit=4))
