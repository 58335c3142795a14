"""One run on this rank: build the step, run the timed steps, then measure what is measured after them.

``llmopt.train`` (the command line: flags, checks, launching ranks) calls ``run``. The timed loop is
``timed_steps``; what happens after it has a function each, in this order: ``--save`` (the model the losses
describe), the memory step (``--memory-breakdown``: one more step under MemTracker), gathering every rank's
figures into ``RunMetrics``, writing them, and ``--profile`` (two more steps under torch.profiler).
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from llmopt.convergence import Convergence
from llmopt.core import cli
from llmopt.core.config import TrainConfig
from llmopt.core.run_metrics import RunMetrics
from llmopt.faults import SLOW_S, maybe_fail, slow_steps
from llmopt.instruments import (
    EnergyMeter,
    StepTimer,
    coefficient_of_variation,
    measured_steps,
    peak_memory_bytes,
    peak_rss_bytes,
    percentile,
    reset_peak_memory,
)
from llmopt.launch import LAUNCH_T0_ENV, under_launcher
from llmopt.safe_files import open_file

# A budget that would train longer than this at the measured step time is refused after its first steps: a
# mistyped --max-tokens (1e30) or --steps should end with a sentence, not run for ever without one.
HORIZON_S = 365 * 86400
ETA_STEP = 1  # the step after which the time per step is known (step 0 pays first-call costs)
ETA_MIN_S = 60.0  # an ETA line is printed (even with --quiet) when the rest of the run takes longer than this


@dataclass(frozen=True)
class RunOptions:
    """What a run does besides its steps (llmopt.train's flags of the same names)."""
    timing_warmup: int = 1
    memory_breakdown: bool = False
    save: str | None = None
    metrics_out: str | None = None
    profile: str | None = None
    quiet: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    checkpoint_keep: int = 2
    final_checkpoint: bool = True           # False: --no-final-checkpoint (a checkpoint every N steps, on a signal)
    resume_from: str | None = None          # a checkpoint directory (llmopt.dcp), checked by llmopt.train
    log_dir: str | None = None              # TensorBoard event files (``Board``)


@dataclass
class Timed:
    """What the timed loop saw on this rank."""
    warmup: int
    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    step_ms: list = field(default_factory=list)
    optimizer_ms: list = field(default_factory=list)
    fp16_skipped: int = 0
    diverged_at: int | None = None
    diverged_why: str | None = None
    conv: Convergence | None = None
    power: dict = field(default_factory=dict)
    peak: int = 0
    resumed_from: int | None = None  # the steps a checkpoint had done when this run resumed it
    load_s: float | None = None      # seconds its loading took
    stopped_by: int = 0              # the signal that stopped the run early, with a checkpoint (StopRequest)
    starts: list = field(default_factory=lambda: [0])  # the steps the run started at: 0 and each resume's


def run(cfg: TrainConfig, opts: RunOptions) -> int:
    """The run on this rank; returns its exit code. torch elastic's ``record`` writes an exception where the
    launcher reads which rank failed and why."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_run)(cfg, opts)


def _run(cfg: TrainConfig, opts: RunOptions) -> int:
    from llmopt.step import build

    device, rank, local_rank, distributed = _join(cfg)
    try:
        t_build = time.time()
        startup = t_build - float(os.environ.get(LAUNCH_T0_ENV, t_build))
        state = build(cfg, device)
        build_s = time.time() - t_build
        log = rank == 0 and not opts.quiet
        if log:
            print(header_line(state), flush=True)
        saver = None
        if opts.checkpoint_dir is not None:
            from llmopt.dcp import Saver

            saver = Saver(opts.checkpoint_dir, opts.checkpoint_every, opts.checkpoint_keep, rank,
                          opts.final_checkpoint)
        timed = timed_steps(state, rank, local_rank, opts.timing_warmup, log, opts.resume_from, saver,
                            opts.log_dir if rank == 0 else None)
        if timed.stopped_by:  # no metrics: the run is not over, and its next start continues it
            if rank == 0:
                return cli.error(f"stopped by {signal.Signals(timed.stopped_by).name} after {len(timed.losses)} "
                                 f"steps, with a checkpoint in {saver.root}; the same command continues the run",
                                 cli.PREEMPTED)
            return cli.PREEMPTED
        finished = timed.diverged_at is None
        if opts.save and finished:  # before any extra step: the model the losses describe
            save_model(state, opts.save, log)
        breakdown, memory_step_s = memory_step(state) if opts.memory_breakdown and finished else (None, None)
        metrics = summarize(state, timed, breakdown, memory_step_s, startup_s=startup, build_s=build_s,
                            resumed_from_step=timed.resumed_from, checkpoint_load_s=timed.load_s,
                            **(saver.figures() if saver else {}))
        if rank == 0:
            if opts.metrics_out:
                with open_file(opts.metrics_out) as f:  # never through a link planted in a results directory
                    json.dump(asdict(metrics), f, indent=1)
            if not opts.quiet:
                print(done_line(metrics, cfg), flush=True)
        if opts.profile and finished:  # untimed steps, after --save
            profile_steps(state, opts.profile, rank, log)
        if not finished:
            if rank == 0:
                amp = "" if cfg.precision == "fp32" else f" (or train in fp32 instead of {cfg.precision})"
                return cli.error(f"diverged at step {timed.diverged_at}: {timed.diverged_why}; lower --lr{amp}",
                                 cli.DIVERGED)
            return cli.DIVERGED
    except (torch.OutOfMemoryError, MemoryError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        return cli.error(f"out of memory on rank {rank}: {why}", cli.OUT_OF_MEMORY)
    except ValueError as e:  # a problem only found once the data is read (e.g. a split shorter than a sequence)
        return cli.error(str(e))
    except RuntimeError as e:
        if "allocate" not in str(e):
            raise
        return cli.error(f"out of memory on rank {rank}: {str(e).splitlines()[0]}", cli.OUT_OF_MEMORY)  # CPU
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _join(cfg: TrainConfig) -> tuple[torch.device, int, int, bool]:
    """This rank's device, and the process group when there are several ranks: (device, rank, local rank,
    distributed)."""
    distributed = under_launcher() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if under_launcher():
        from llmopt.launch import die_with_parent

        die_with_parent()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    return device, (dist.get_rank() if distributed else 0), local_rank, distributed


def timed_steps(state, rank: int, local_rank: int, warmup: int, log: bool, resume_from: str | None = None,
                saver=None, log_dir: str | None = None) -> Timed:
    """The timed loop: one optimizer step at a time, one host sync a step (the loss, for the per-step line and
    the divergence check), held-out evals where due (off the clock), a checkpoint where due (``saver``: off the
    clock too), until the steps, the target or a divergence end it. With ``resume_from`` the run continues a
    checkpoint's: its state, its record so far, from its step. Returns what it saw; figures are made from it
    afterwards (``summarize``)."""
    from llmopt.step import train_step

    cfg, device = state.cfg, state.device
    timer, energy = StepTimer(device), EnergyMeter(device, local_rank)
    t = Timed(warmup=min(warmup, cfg.steps - 1), conv=Convergence(cfg, state.source.entropy_rate))
    start = 0
    if resume_from is not None:
        from llmopt.dcp import load

        t0 = time.perf_counter()
        start = t.resumed_from = load(state, resume_from, t)
        t.load_s = time.perf_counter() - t0
        if log:
            print(f"resumed: {resume_from} (after step {start - 1}, {len(t.conv.evals)} evals)", flush=True)
    board = Board(log_dir, state, start) if log_dir else None
    stop_request, stopped = None, lambda: False  # stopped: asked by the fault hook's wait (tests only)
    if saver is not None:
        from llmopt.dcp import StopRequest

        stop_request = StopRequest()
        stopped = lambda: stop_request.signum != 0  # noqa: E731
    reset_peak_memory(device)
    slow = slow_steps(rank, cfg.seed)  # tests only: stalls inside the timing (empty otherwise)
    stop = t.conv.reached is not None if start else (t.conv.due(0) and t.conv.evaluate(state, 0, 0.0))
    if board is not None and t.conv.evals and not start:
        board.eval(t.conv.evals[-1])
    for step in range(start, cfg.steps):
        if stop and step > 0:  # at least one step, even when the target is met before training
            break
        maybe_fail(rank, step, cfg.seed, stopped)
        if step == t.warmup:
            energy.start()
        with timer:
            stats = train_step(state, step)
            loss = stats.loss.item()
            if step in slow:
                time.sleep(SLOW_S)
        t.losses.append(loss)
        t.grad_norms.append(stats.grad_norm.item())
        t.step_ms.append(timer.times_ms[-1])
        t.optimizer_ms.append(stats.optimizer_time.ms() if stats.optimizer_time is not None else 0.0)
        t.fp16_skipped += int(stats.fp16_skipped)
        if log:
            print(step_line(step, loss, t.step_ms[-1], stats), flush=True)
        if board is not None:
            board.step(step + 1, loss, t.grad_norms[-1], t.step_ms[-1])
        if step == start + ETA_STEP:
            eta(cfg, t.step_ms[-1], rank, cfg.steps - step - 1)
        t.diverged_why = t.conv.divergence(step, loss)
        if t.diverged_why is not None:
            t.diverged_at = step
            break
        if t.conv.due(step + 1):
            # once reached, the target stays reached: a later eval above it must not resume the run
            stop = t.conv.evaluate(state, step + 1, sum(t.step_ms) / 1e3) or t.conv.reached is not None
            if log:
                print(eval_line(t.conv.evals[-1], stop), flush=True)
            if board is not None:
                board.eval(t.conv.evals[-1])
        last = stop or step + 1 == cfg.steps
        if saver is not None and saver.due(step + 1, last):
            saver.save(state, step + 1, t)
            if log:
                print(f"checkpoint: after step {step} in {saver.root}", flush=True)
        if stop_request is not None and not last and (signum := stop_request.agreed(device)):
            if not saver.saved(step + 1):
                saver.save(state, step + 1, t)
            t.stopped_by = signum
            break
    if stop_request is not None:
        stop_request.close()
    t.power, t.peak = energy.stop(), peak_memory_bytes(device)
    if board is not None:
        board.close()
    return t


class Board:
    """``--log-dir``: TensorBoard event files (``torch.utils.tensorboard``), written by rank 0, one point per
    step (numbered by steps done, as evals are) under torchtitan's names where it has one: the loss, the gradient
    norm before clipping, the learning rate, tokens per second, model TFLOP/s per device and, on CUDA, MFU
    against a known GPU's datasheet peak and the allocator's peaks; ``eval/loss`` at each eval. A resumed run
    writes into the same directory from the step after its checkpoint's (``purge_step``: what a killed run
    logged beyond it is dropped by TensorBoard)."""

    def __init__(self, log_dir: str, state, start: int):
        from torch.utils.tensorboard import SummaryWriter

        from llmopt.core.peaks import datasheet_peak
        from llmopt.core.shapes import flops_per_token

        cfg = state.cfg
        self.writer = SummaryWriter(log_dir, purge_step=start + 1 if start else None)
        self.optimizer, self.cuda = state.optimizer, state.device.type == "cuda"
        self.tokens = cfg.tokens_per_step
        self.flops = flops_per_token(cfg.model_config, cfg.seq_len) / (cfg.world_size if self.cuda else 1)
        # MFU only against a stated peak: a known GPU's datasheet (a CPU's is measured by the harness, not here)
        self.peak = datasheet_peak(torch.cuda.get_device_name(state.device), cfg.precision) if self.cuda else None

    def step(self, steps_done: int, loss: float, grad_norm: float, step_ms: float) -> None:
        w, tps = self.writer, self.tokens / (step_ms / 1e3)
        w.add_scalar("loss_metrics/global_avg_loss", loss, steps_done)
        w.add_scalar("grad_norm", grad_norm, steps_done)
        w.add_scalar("lr", float(self.optimizer.param_groups[0]["lr"]), steps_done)
        w.add_scalar("throughput(tps)", tps, steps_done)
        w.add_scalar("tflops", tps * self.flops / 1e12, steps_done)
        if self.peak:
            w.add_scalar("mfu(%)", 100 * tps * self.flops / self.peak, steps_done)
        if self.cuda:
            w.add_scalar("memory/max_active(GiB)", torch.cuda.max_memory_allocated() / 2**30, steps_done)
            w.add_scalar("memory/max_reserved(GiB)", torch.cuda.max_memory_reserved() / 2**30, steps_done)

    def eval(self, point) -> None:
        self.writer.add_scalar("eval/loss", point.loss, point.step)

    def close(self) -> None:
        self.writer.close()


def eta(cfg: TrainConfig, step_ms: float, rank: int, steps_left: int) -> None:
    """Once the time per step is known: the rest of the run's time on one line (rank 0), and a budget that would
    take more than HORIZON_S refused (ValueError: exit 2) on every rank alike (the slowest rank's estimate,
    one all-reduce, so that no rank goes on alone)."""
    left = steps_left * step_ms / 1e3
    if dist.is_initialized():
        t = torch.tensor([left], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        left = float(t.item())
    if left > HORIZON_S:
        raise ValueError(f"{cfg.steps:,} steps at {step_ms:.1f} ms each would take {left / 86400 / 365:,.1f} years "
                         f"(more than {HORIZON_S / 86400:.0f} days); lower --steps or --max-tokens")
    if rank == 0 and left > ETA_MIN_S:
        print(f"eta: {steps_left:,} more steps at {step_ms:.1f} ms: about "
              f"{datetime.timedelta(seconds=round(left))} (evals not included)", flush=True)


def measure(state, warmup: int = 1) -> RunMetrics:
    """The timed steps of a built state and their figures, quietly, in this process (a library caller's run;
    no save, memory step or profile)."""
    return summarize(state, timed_steps(state, 0, 0, warmup, log=False), None, None)


def save_model(state, path: str, log: bool) -> None:
    from llmopt.checkpoint import save_pretrained

    save_pretrained(state, path)
    if log:
        print(f"saved: {path} (Hugging Face format; python -m llmopt.sample {path})", flush=True)


def memory_step(state) -> tuple[dict, float]:
    """One extra, untimed step under MemTracker: (memory by category at its peak, seconds it took). An optimizer
    whose heaviest step recurs (``heavy_every``: SOAP refreshes its eigenbases on its 11th, 21st, ... step) and
    that the run has brought to one (the step after the run counted) is first stepped, untracked, to its next
    such step, so that the figure is the run's peak and not an ordinary step's (at most heavy_every - 1 steps)."""
    from llmopt.instruments import tracked_memory_step
    from llmopt.optimizers import spec as optimizer_spec
    from llmopt.step import train_step

    t0 = time.time()
    step, every = state.cfg.steps, optimizer_spec(state.cfg.optimizer).heavy_every
    if every and step >= every:
        for _ in range(-step % every):  # to the optimizer's (step + 1)-th call with step a multiple of every
            train_step(state, step)
            step += 1
    breakdown = tracked_memory_step(state, lambda: train_step(state, step))
    return breakdown, time.time() - t0


def profile_steps(state, out_dir: str, rank: int, log: bool) -> None:
    from llmopt.instruments import profiled_steps
    from llmopt.step import train_step

    table = profiled_steps(state, lambda i: train_step(state, i), out_dir, rank, state.cfg.steps + 1)
    if log:
        print(f"profile: {table} (each rank's operator table and trace.json are in {out_dir})", flush=True)


def summarize(state, t: Timed, breakdown: dict | None, memory_step_s: float | None, **extra) -> RunMetrics:
    """The run's figures from what the loop saw on every rank (collective: each rank's peak memory, breakdown
    and energy are gathered)."""
    from llmopt.core.shapes import flops_per_token, param_count
    from llmopt.memory import predict_memory

    cfg, device = state.cfg, state.device
    peak, kind = t.peak, "cuda_allocator" if device.type == "cuda" else "process_rss"
    if breakdown is not None and device.type != "cuda":
        peak, kind = breakdown["total"], "tracked_tensors"
    per_rank = state.layout.gather_object({"peak": peak, "rss": peak_rss_bytes(), "breakdown": breakdown,
                                           "energy_j": t.power["energy_j"], "gpu_util": t.power["gpu_util_mean"],
                                           "gpu_power": t.power["gpu_power_w_mean"]})
    times = measured_steps(t.step_ms, t.warmup, t.starts)
    updates = measured_steps(t.optimizer_ms, t.warmup, t.starts)
    tokens = cfg.global_batch * cfg.seq_len
    energies = [r["energy_j"] for r in per_rank if r["energy_j"] is not None]
    worst = max(per_rank, key=lambda r: r["peak"])

    def mean_of(key):
        vals = [r[key] for r in per_rank if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    return RunMetrics(
        config=cfg.to_dict(), losses=t.losses, grad_norms=t.grad_norms, step_time_ms=t.step_ms,
        optimizer_ms=t.optimizer_ms, timing_warmup=t.warmup, step_time_ms_p50=percentile(times, 50),
        step_time_ms_p90=percentile(times, 90), optimizer_ms_p50=percentile(updates, 50),
        step_time_cv=coefficient_of_variation(times), optimizer_ms_cv=coefficient_of_variation(updates),
        tokens_per_s=tokens * len(times) / (sum(times) / 1e3),
        peak_memory_bytes=worst["peak"], peak_memory_kind=kind,
        peak_memory_bytes_per_rank=[r["peak"] for r in per_rank],
        peak_rss_bytes=max(r["rss"] for r in per_rank), memory_breakdown=worst["breakdown"],
        memory_breakdown_per_rank=[r["breakdown"] for r in per_rank], predicted_memory=predict_memory(cfg).to_dict(),
        memory_step_s=memory_step_s, fp16_skipped_steps=t.fp16_skipped, diverged_at_step=t.diverged_at,
        diverged_reason=t.diverged_why, **t.conv.to_metrics(),
        energy_j_per_token=(sum(energies) / (tokens * len(times)) if energies and t.diverged_at is None else None),
        gpu_util_mean=mean_of("gpu_util"), gpu_power_w_mean=mean_of("gpu_power"),
        entropy_floor_nats=state.source.entropy_rate, data_description=state.source.describe(),
        num_params=param_count(cfg.model_config), flops_per_token=flops_per_token(cfg.model_config, cfg.seq_len),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch_version=torch.__version__, **extra)


# ------------------------------------------------------------------------------------------- the lines
def header_line(state) -> str:
    from llmopt.core.shapes import param_count

    cfg = state.cfg
    return (f"llmopt: {cfg.preset} ({param_count(cfg.model_config):,} params) on {state.device.type} x{cfg.world_size} "
            f"[dp={cfg.dp}/{cfg.dp_mode} tp={cfg.tp} pp={cfg.pp}/{cfg.pp_schedule}] {cfg.precision} "
            f"{cfg.optimizer} grad_accum={cfg.grad_accum} data={state.source.describe()}")


def step_line(step: int, loss: float, ms: float, stats) -> str:
    return (f"step {step:4d} | loss {loss:.4f} | {ms:8.1f} ms | {stats.tokens / ms * 1e3:10,.0f} tok/s"
            + (" | fp16 skipped" if stats.fp16_skipped else ""))


def eval_line(e, reached: bool) -> str:
    return (f"eval after {e.step} steps | loss {e.loss:.4f} | lr {e.lr:.3g}"
            + (f" | B_simple {e.gns_b_simple:.1f}" if e.gns_b_simple else "")
            + (" | target reached" if reached else ""))


def done_line(m: RunMetrics, cfg: TrainConfig) -> str:
    line = (f"done: {m.tokens_per_s:,.0f} tok/s (after {m.timing_warmup} warm-up steps), "
            f"p50 {m.step_time_ms_p50:.1f} ms (optimizer {m.optimizer_ms_p50:.1f} ms), "
            f"peak memory {m.peak_memory_bytes / 2**20:,.1f} MiB "
            f"({m.peak_memory_kind}), final loss {m.losses[-1]:.4f}")
    if cfg.precision == "fp16":
        line += f", fp16 skipped {m.fp16_skipped_steps}"
    if m.target_loss is None:
        return line + (f", final eval loss {m.final_eval_loss:.4f}" if m.final_eval_loss is not None else "")
    if m.steps_to_target is None:
        return line + f", target {m.target_loss:.4f} not reached (best eval {m.best_eval_loss:.4f})"
    return (line + f", target {m.target_loss:.4f} reached after {m.steps_to_target} steps, "
            f"{m.tokens_to_target:,} tokens, {m.seconds_to_target:.1f} s")
