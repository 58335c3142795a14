"""What one run measured, as its metrics JSON holds it (``RunMetrics``): apart from the measuring
(``llmopt.instruments``), so that what only reads a run's figures (the harness's rows and reports, a SLURM job's
wrapper) imports no torch."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields


def _m(row: str | None = None, default=None):
    """A RunMetrics field; ``row`` says which results rows copy it as a column: "run" (every run that produced
    metrics, a diverged one included), "ok" (finished runs), or None (lists and dicts a row derives from)."""
    return field(default=default, metadata={"row": row})


@dataclass
class RunMetrics:
    """What one run measured: the metrics JSON of ``llmopt.train --metrics-out`` (its keys are these fields),
    read by the harness by attribute (``RunMetrics.from_json``). Meaningful on rank 0."""
    config: dict = _m()                           # the resolved TrainConfig, world_size and micro_batch added
    losses: list = _m()                           # training loss per step
    grad_norms: list = _m()                       # gradient norm before clipping, per step
    step_time_ms: list = _m()                     # per step, warm-up included
    optimizer_ms: list = _m()                     # the optimizer's update alone, per step
    timing_warmup: int = _m("run", 0)             # steps left out of the figures below, after each (re)start
    step_time_ms_p50: float = _m("ok")
    step_time_ms_p90: float = _m("ok")
    step_time_cv: float | None = _m("ok")         # the timed steps' standard deviation over their mean
    optimizer_ms_p50: float = _m("ok")
    optimizer_ms_cv: float | None = _m("ok")      # the same spread for the update alone
    tokens_per_s: float = _m("ok")
    peak_memory_bytes: int = _m("ok")             # the rank with the largest peak
    peak_memory_kind: str = _m("ok")              # cuda_allocator, tracked_tensors or process_rss
    peak_memory_bytes_per_rank: list = _m()
    peak_rss_bytes: int = _m("ok")
    memory_breakdown: dict | None = _m()          # by category, of the rank with the largest peak
    memory_breakdown_per_rank: list = _m()
    predicted_memory: dict = _m()                 # llmopt.memory's prediction by category, and its total
    memory_step_s: float | None = _m("run")
    fp16_skipped_steps: int = _m("ok", 0)
    diverged_at_step: int | None = _m("run")
    diverged_reason: str | None = _m()
    target_loss: float | None = _m("run")         # the target in nats (--target-gap resolved), None without one
    steps_to_target: int | None = _m("run")
    tokens_to_target: int | None = _m("run")
    seconds_to_target: float | None = _m("run")
    final_eval_loss: float | None = _m("run")
    best_eval_loss: float | None = _m("run")
    gns_b_simple: float | None = _m("run")
    eval_seconds: float = _m("run", 0.0)
    evals: list = _m()                            # llmopt.convergence.EvalPoint as dicts
    energy_j_per_token: float | None = _m("ok")
    gpu_util_mean: float | None = _m("ok")
    gpu_power_w_mean: float | None = _m("ok")
    entropy_floor_nats: float | None = _m("ok")
    data_description: str = _m("run", "")
    num_params: int = _m()
    flops_per_token: float = _m("ok")
    device_name: str = _m()
    torch_version: str = _m()
    startup_s: float | None = _m("run")           # from the harness's launch to the first line of rank 0's work
    build_s: float | None = _m("run")             # building the model, layout, optimizer and data
    resumed_from_step: int | None = _m("run")          # the steps done by the checkpoint this run resumed (llmopt.dcp)
    checkpoints_saved: int | None = _m("run")          # --checkpoint-dir: checkpoints written by this run
    checkpoint_bytes: int | None = _m("run")           # the last one's size on disk
    checkpoint_save_s: float | None = _m("run")        # seconds per save, mean (every rank writes its shards)
    checkpoint_load_s: float | None = _m("run")        # seconds the resumed checkpoint took to load, on rank 0

    @classmethod
    def from_json(cls, d: dict) -> "RunMetrics":
        """From a metrics JSON (keys this version does not know are ignored; missing ones take defaults). A
        ValueError when it is not a run's metrics (no config or losses)."""
        if not isinstance(d, dict) or not isinstance(d.get("config"), dict) or not isinstance(d.get("losses"), list):
            raise ValueError("not a run's metrics (no config or losses)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def columns(cls, row: str) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata["row"] == row)


def read_metrics(path: str) -> tuple[RunMetrics | None, str]:
    """A run's metrics JSON: (metrics, "") or (None, why); (None, "") when there is none. A full disk can leave
    an empty file, which fails that config, not the sweep. Read by the sweep and by a job's wrapper alike."""
    if not os.path.exists(path):
        return None, ""
    try:
        with open(path) as f:
            return RunMetrics.from_json(json.load(f)), ""
    except (OSError, ValueError, TypeError) as e:
        return None, f"metrics JSON unreadable ({e}); is the disk full?"
