"""What every executor shares: the config's outcome, the device slots, the argv and environment of a config's
process, how an exit code becomes a row status, and the job handle's files and clock."""
from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass

from bench.noise import RETIME
from bench.plan import WARMUP_PREFIX, PlanEntry
from llmopt.core.config import TrainConfig
from llmopt.core.run_metrics import RunMetrics, read_metrics
from llmopt.faults import RETIME_ENV
from llmopt.launch import LAUNCH_T0_ENV, SECONDARY_ERRORS
from llmopt.safe_files import open_file, write_json

EXECUTORS = ("local", "submitit-local", "slurm")
SLURM_IN_FLIGHT = 256  # --jobs auto under slurm: the scheduler queues; this bounds what one sweep submits


class ExecutorError(ValueError):
    """A bad --executor/--jobs choice or a missing scheduler: one line for the user, exit 2."""


@dataclass(frozen=True)
class Outcome:
    status: str
    error: str
    metrics: RunMetrics | None
    wall: float
    peak: tuple[float, str] | None = None  # peak FLOP/s (value, source) taken where the config ran (SLURM)
    requeues: int = 0  # how many times SLURM requeued its job (each time resumed from its checkpoint)


@dataclass(frozen=True)
class Slot:
    """The devices one running config may use: CPU cores (None: all) and GPU indices (None: as visible)."""
    cpus: tuple[int, ...] | None = None
    gpus: tuple[int, ...] | None = None


class Slots:
    """Disjoint device sets for concurrent configs. CPU: ``jobs`` equal groups of the cores this process may
    use, one per config whatever its world size (its ranks share the group). CUDA: a config of world size w
    takes w free GPUs. ``jobs`` = 1 on CPU is one slot with no pinning: today's behaviour exactly; ``pin``
    False gives ``jobs`` unpinned slots (SLURM: the configs run elsewhere, the slots only bound how many)."""

    def __init__(self, device: str, jobs: int, n_gpus: int = 0, pin: bool = True):
        self.device, self.jobs = device, jobs
        self.groups: list[Slot] = []  # pinned CPU: every group, so that the whole machine can be lent and returned
        if device == "cuda":
            self.free_gpus = list(range(n_gpus))
            self.total = n_gpus
        elif jobs == 1 or not pin:
            self.free = [Slot() for _ in range(jobs)]
        else:
            cores = sorted(os.sched_getaffinity(0))
            if jobs > len(cores):
                raise ExecutorError(f"--jobs {jobs}: only {len(cores)} CPU cores here; use --jobs {len(cores)} "
                                    f"or fewer")
            per = len(cores) // jobs
            self.groups = [Slot(cpus=tuple(cores[i * per:(i + 1) * per])) for i in range(jobs)]
            self.free = list(self.groups)

    def too_big(self, world_size: int) -> str | None:
        """Why a config can never run here (a skip reason), or None."""
        if self.device == "cuda" and world_size > self.total:
            return f"needs {world_size} GPUs, this machine has {self.total}"
        return None

    def take(self, world_size: int, running: int) -> Slot | None:
        if self.device == "cuda":
            if running >= self.jobs or len(self.free_gpus) < world_size:
                return None
            gpus, self.free_gpus = self.free_gpus[:world_size], self.free_gpus[world_size:]
            return Slot(gpus=tuple(gpus))
        return self.free.pop(0) if self.free else None

    def take_whole(self, running: int) -> Slot | None:
        """Every core as one unpinned slot, once nothing runs (pinned CPU slots only): for a config whose figure is
        its time, which beside another config would share memory bandwidth and caches, and whose ranks would share
        one group's cores."""
        if not self.groups:
            raise ValueError("take_whole: only for CPU slots pinned to groups of cores (--jobs above 1)")
        if running or len(self.free) < len(self.groups):
            return None
        self.free = []
        return Slot()

    def give(self, slot: Slot) -> None:
        if self.device == "cuda":
            self.free_gpus = sorted(self.free_gpus + list(slot.gpus))
        elif self.groups and slot.cpus is None:  # the whole machine, lent by take_whole
            self.free = list(self.groups)
        else:
            self.free.append(slot)


def resolve_jobs(jobs: str, executor: str, device: str) -> tuple[int, int]:
    """(concurrent configs, GPUs on this machine) from --jobs N|auto. auto: one at a time on CPU (concurrent
    configs share memory bandwidth and would distort each other's figures), every GPU busy on CUDA, up to
    SLURM_IN_FLIGHT jobs queued on SLURM."""
    n_gpus = 0
    if device == "cuda" and executor != "slurm":
        import torch

        n_gpus = torch.cuda.device_count()
    if jobs == "auto":
        if executor == "slurm":
            return SLURM_IN_FLIGHT, n_gpus
        return (max(1, n_gpus) if device == "cuda" else 1), n_gpus
    try:
        n = int(jobs)
    except ValueError:
        n = 0
    if n < 1:
        raise ExecutorError(f"--jobs {jobs!r}: use a positive number or auto")
    return n, n_gpus


def config_argv(config_path: str, metrics_path: str, warmup: int) -> list[str]:
    """``llmopt.train``'s arguments for one config (after ``python -m llmopt.train``): the config itself is the
    file ``write_config`` wrote, read back as the ``TrainConfig`` it is (never rebuilt from flags)."""
    return ["--config", config_path, "--quiet", "--memory-breakdown", "--timing-warmup", str(warmup),
            "--metrics-out", metrics_path]


def checkpoint_argv(checkpoint_dir: str, every: int) -> list[str]:
    """A sweep's config checkpoints for a requeue or a resumed sweep, not to be kept: the last one only, none
    after the last step, one when SLURM's stop signal comes (llmopt.dcp.StopRequest) and every ``every`` steps
    (0: only then). A directory that already holds one (an earlier attempt) is resumed."""
    argv = ["--checkpoint-dir", checkpoint_dir, "--checkpoint-keep", "1", "--no-final-checkpoint"]
    return argv + (["--checkpoint-every", str(every)] if every else [])


def write_config(path: str, cfg: TrainConfig) -> None:
    """The config a run is handed (``llmopt.train --config``): every field of the ``TrainConfig``, as JSON."""
    write_json(path, asdict(cfg))


def config_env(cfg: TrainConfig, slot: Slot) -> dict:
    """The config's environment: its ranks split the slot's cores (or the machine's) between them."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    world = cfg.world_size
    cores = len(slot.cpus) if slot.cpus else (os.cpu_count() or 1)
    if world > 1 or slot.cpus:
        env["OMP_NUM_THREADS"] = str(max(1, cores // world))
    if slot.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slot.gpus))
    return env


def status_of(rc: int, timed_out: bool) -> str:
    from llmopt.core import cli

    if timed_out:
        return "timeout"
    if rc == 0:
        return "ok"
    if rc == cli.DIVERGED:
        return "diverged"
    if rc in (cli.OUT_OF_MEMORY, -signal.SIGKILL, 128 + signal.SIGKILL):
        return "oom"  # a SIGKILL the harness did not send is the kernel's OOM killer
    return "failed"


def last_error_line(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [l.strip() for l in f.read().splitlines() if l.strip()]
    except OSError:
        return ""
    lines = [l for l in lines if not l.startswith("$ ")]  # the harness's own command line is never the error
    errors = [l for l in lines if l.startswith("error:")]
    # across nodes, each node's launcher says what failed there: a rank that lost its peers is not the cause
    primary = [l for l in errors if not any(s in l for s in SECONDARY_ERRORS)]
    return (primary or errors or lines or [""])[-1][:500]


def outcome_of(rc: int | None, timed_out: bool, timeout: float, metrics_path: str, log_path: str, wall: float,
               reason: str = "") -> Outcome:
    """The config's status and error from its exit code and files (``reason``: a scheduler's own word)."""
    status = status_of(rc if rc is not None else 1, timed_out)
    metrics, unreadable = read_metrics(metrics_path)
    if status == "ok" and metrics is None:
        status = "failed"
    error = unreadable
    if status == "timeout":
        error = reason or f"killed after {timeout:.0f} s (--timeout)"
    elif status != "ok":
        line = last_error_line(log_path)
        if rc is not None and rc < 0:  # a signal: the log's last line is a crash dump, not an error message
            line = line if line.startswith("error:") else ""
        error = reason or error or line
        if status == "oom" and rc in (-signal.SIGKILL, 128 + signal.SIGKILL) and not reason:
            error = "killed by SIGKILL (the kernel's OOM killer?)" + (f"; {error}" if error else "")
        elif not error:
            error = f"killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exit code {rc}"
    return Outcome(status, error, metrics, wall)


class Job:
    """What every executor shares: the config's files (fresh ones: a process left over from an earlier
    attempt writes into the unlinked old inode, never into this attempt's), its clock and its timeout."""

    def __init__(self, entry: PlanEntry, out_dir: str, timeout: float, warmup: int, slot: Slot,
                 checkpoint_every: int | None = None, log_dir: str | None = None):
        cid = entry.config_id
        self.entry, self.slot, self.timeout = entry, slot, timeout
        self.metrics_path = os.path.join(out_dir, "metrics", f"{cid}.json")
        self.log_path = os.path.join(out_dir, "logs", f"{cid}.log")
        config_path = os.path.join(out_dir, "configs", f"{cid}.json")
        for path in (self.metrics_path, self.log_path):
            if os.path.exists(path):
                os.remove(path)  # a rerun after resume must not read (or share) a stale file
        write_config(config_path, entry.config)
        self.argv = config_argv(config_path, self.metrics_path, warmup)
        self.checkpoint_dir = None
        if entry.phase != RETIME and not cid.startswith(WARMUP_PREFIX):  # timing runs: no resume, no log
            if checkpoint_every is not None:
                self.checkpoint_dir = os.path.join(out_dir, "checkpoints", cid)
                self.argv += checkpoint_argv(self.checkpoint_dir, checkpoint_every)
            if log_dir is not None:
                self.argv += ["--log-dir", os.path.join(log_dir, cid)]
        self.env = config_env(entry.config, slot)
        self.env[LAUNCH_T0_ENV] = repr(time.time())  # start-up is measured from here (llmopt.loop)
        if entry.phase == RETIME:
            self.env[RETIME_ENV] = "1"
        with open_file(self.log_path, "w") as log:
            log.write("$ llmopt.train " + " ".join(self.argv) + "\n")
        self.t0 = time.monotonic()

    def drop_checkpoints(self) -> None:
        """After an ok row: the config's checkpoints were for a requeue or a resume, and a model's optimizer
        state is several times its size; a row that did not end ok keeps them (a --resume continues it)."""
        if self.checkpoint_dir is not None:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


