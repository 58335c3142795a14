"""Where and how bench.run runs a config: ``--executor local`` (this machine, forked from a pre-imported
launcher), ``submitit-local`` (the same jobs through submitit's local executor) or ``slurm`` (one SLURM job
per config through ``submitit.AutoExecutor``), and ``--jobs``: how many configs run at once, on which devices.

Every executor gives the harness the same thing: a handle it polls until it yields the config's
``Outcome`` (status, error, metrics, wall seconds), and ``cancel()``. Whatever a config does (segfault, hang,
allocate until killed), its processes are its own and are gone when its outcome is known.

Why a pre-imported launcher: a config's wall time on 2 CPU cores was mostly imports (torch, DTensor,
pipelining, dynamo), paid by the config's process and again by each rank. ``local`` starts one
``multiprocessing`` forkserver per sweep that imports them once (``llmopt.launch.RANK_MODULES``, before any
torch op, so no thread pool exists to be copied), and forks each config's process from it; that process forks
its ranks in turn (``llmopt.launch``). Each config still gets a session (process group) of its own, so a
timeout still kills all of it, and dies with the launcher, which dies with the sweep.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace

from bench.job import read_metrics, run_in_job
from bench.noise import RETIME
from llmopt.config import TrainConfig
from llmopt.faults import RETIME_ENV
from llmopt.launch import LAUNCH_T0_ENV
from llmopt.run_metrics import RunMetrics
from llmopt.safe_files import open_file

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


@dataclass(frozen=True)
class Slot:
    """The devices one running config may use: CPU cores (None: all) and GPU indices (None: as visible)."""
    cpus: tuple[int, ...] | None = None
    gpus: tuple[int, ...] | None = None


def world_size(cfg: dict) -> int:
    """Ranks of a plan entry's config (``TrainConfig.world_size``: one definition)."""
    return TrainConfig(**cfg).world_size


class Slots:
    """Disjoint device sets for concurrent configs. CPU: ``jobs`` equal groups of the cores this process may
    use, one per config whatever its world size (its ranks share the group). CUDA: a config of world size w
    takes w free GPUs. ``jobs`` = 1 on CPU is one slot with no pinning: today's behaviour exactly; ``pin``
    False gives ``jobs`` unpinned slots (SLURM: the configs run elsewhere, the slots only bound how many)."""

    def __init__(self, device: str, jobs: int, n_gpus: int = 0, pin: bool = True):
        self.device, self.jobs = device, jobs
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
            self.free = [Slot(cpus=tuple(cores[i * per:(i + 1) * per])) for i in range(jobs)]

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

    def give(self, slot: Slot) -> None:
        if self.device == "cuda":
            self.free_gpus = sorted(self.free_gpus + list(slot.gpus))
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


def config_argv(entry: dict, metrics_path: str, warmup: int) -> list[str]:
    """``llmopt.train``'s arguments for one config (after ``python -m llmopt.train``)."""
    from llmopt.config import CHECKPOINT
    from llmopt.train import unused_fields

    argv = ["--quiet", "--memory-breakdown", "--timing-warmup", str(warmup), "--metrics-out", metrics_path]
    no_effect = unused_fields(TrainConfig(**entry["config"]))  # llmopt.train refuses these given
    for k, v in entry["config"].items():
        flag = f"--{k.replace('_', '-')}"
        if k == "preset" and v == CHECKPOINT:
            continue  # the shape comes from --init: llmopt.train takes no --preset then
        field = TrainConfig.__dataclass_fields__[k]
        if field.metadata["given_positive"] and v == field.default:
            continue  # 0 stands for the default (the optimizer's learning rate): given, it would be refused
        if k in no_effect:
            continue  # no effect in this combination: the run is the same without it
        if isinstance(v, bool):
            argv += [flag] if v else []
        elif v is not None:
            argv += [flag, str(v)]
    return argv


def config_env(cfg: dict, slot: Slot) -> dict:
    """The config's environment: its ranks split the slot's cores (or the machine's) between them."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    world = world_size(cfg)
    cores = len(slot.cpus) if slot.cpus else (os.cpu_count() or 1)
    if world > 1 or slot.cpus:
        env["OMP_NUM_THREADS"] = str(max(1, cores // world))
    if slot.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slot.gpus))
    return env


def status_of(rc: int, timed_out: bool) -> str:
    from llmopt import cli

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
    return (errors or lines or [""])[-1][:500]


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


class _Job:
    """What every executor shares: the config's files (fresh ones: a process left over from an earlier
    attempt writes into the unlinked old inode, never into this attempt's), its clock and its timeout."""

    def __init__(self, entry: dict, out_dir: str, timeout: float, warmup: int, slot: Slot):
        cid = entry["config_id"]
        self.entry, self.slot, self.timeout = entry, slot, timeout
        self.metrics_path = os.path.join(out_dir, "metrics", f"{cid}.json")
        self.log_path = os.path.join(out_dir, "logs", f"{cid}.log")
        for path in (self.metrics_path, self.log_path):
            if os.path.exists(path):
                os.remove(path)  # a rerun after resume must not read (or share) a stale file
        self.argv = config_argv(entry, self.metrics_path, warmup)
        self.env = config_env(entry["config"], slot)
        self.env[LAUNCH_T0_ENV] = repr(time.time())  # start-up is measured from here (llmopt.runner)
        if entry.get("phase") == RETIME:
            self.env[RETIME_ENV] = "1"
        with open_file(self.log_path, "w") as log:
            log.write("$ llmopt.train " + " ".join(self.argv) + "\n")
        self.t0 = time.monotonic()


class LocalJob(_Job):
    """One config as a process forked from the sweep's pre-imported launcher, in a session of its own.
    Create it with the stop signals blocked (``signals_held``): a SIGTERM between the fork and the caller
    holding this handle would leave a config nobody kills."""

    def __init__(self, launcher, *args):
        super().__init__(*args)
        # daemon: should the sweep ever exit with a config still running, multiprocessing terminates it
        # instead of waiting for it at interpreter exit
        self.proc = launcher.Process(target=config_process, daemon=True,
                                     args=(self.argv, self.env, self.log_path, os.getcwd(), self.slot.cpus))
        self.proc.start()

    def poll(self) -> Outcome | None:
        self.proc.join(0)
        timed_out = self.proc.exitcode is None and time.monotonic() - self.t0 > self.timeout
        if self.proc.exitcode is None and not timed_out:
            return None
        kill_group(self.proc.pid, self._running)
        self.proc.join()
        return outcome_of(self.proc.exitcode, timed_out, self.timeout, self.metrics_path, self.log_path,
                          time.monotonic() - self.t0)

    def cancel(self) -> None:
        kill_group(self.proc.pid, self._running)

    def _running(self) -> bool:
        self.proc.join(0)
        return self.proc.exitcode is None


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class signals_held:
    """Block the stop signals for the body; they are delivered (and raise) as soon as it ends."""

    def __enter__(self):
        self.old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old)


def config_process(argv: list[str], env: dict, log_path: str, cwd: str, cpus) -> None:
    """A config's own process (forked from the launcher): its session, environment, cores and log, then
    ``llmopt.train``'s main, which forks the ranks on CPU."""
    from llmopt.launch import die_with_parent, exit_after, forked_threads

    def body() -> int:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # forked while the sweep held its stop signals
        os.setsid()
        die_with_parent()  # the launcher dies with the sweep, even a SIGKILLed one; so does this config
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        if cpus:
            os.sched_setaffinity(0, cpus)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout.reconfigure(line_buffering=True)
        forked_threads()
        from llmopt.train import main

        sys.argv = ["llmopt.train", *argv]
        return main(argv)

    exit_after(body)


def kill_group(pgid: int, leader_running) -> None:
    """Every process of the config (its leader, ranks, their children) is gone after this. A leader not yet
    past its ``setsid`` (a cancel right after the fork) leads no group and has no children yet: it is signalled
    alone. ``leader_running()`` reaps the leader where this process can, and says whether it still runs."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            try:
                os.kill(pgid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not leader_running() and not _group_alive(pgid):
                return
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# The sweep's PID, for its launcher (bench.launcher_init) to die with it. Here, not there: importing
# bench.launcher_init imports what every rank needs, which the sweep's own process never should.
SWEEP_PID_ENV = "LLMOPT_SWEEP_PID"


def start_launcher():
    """The sweep's pre-imported launcher: a forkserver that has imported what a config's ranks need. It returns
    at once; the launcher's imports go on beside this process until its first config is started."""
    import multiprocessing

    os.environ[SWEEP_PID_ENV] = str(os.getpid())  # read by bench.launcher_init in the forkserver
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["bench.launcher_init", "llmopt.train", "bench.executors"])
    from multiprocessing import forkserver

    forkserver.ensure_running()  # now, with no signal blocked (an exec'd process keeps its parent's mask)
    _mark_launcher_dir()
    return ctx


# multiprocessing keeps the launcher's socket in a directory of its own (<tmp>/pymp-*), removed at a clean exit
# only. This file, written into it, names the sweep that owns it, so the next sweep removes it after a SIGKILL.
LAUNCHER_MARK = "llmopt-sweep.pid"


def _mark_launcher_dir() -> None:
    from multiprocessing import util

    with open(os.path.join(util.get_temp_dir(), LAUNCHER_MARK), "w") as f:
        f.write(str(os.getpid()))


def remove_dead_launcher_dirs() -> list[str]:
    """Launcher directories of sweeps that are gone (killed before multiprocessing could remove them)."""
    import tempfile

    from llmopt.scratch import remove_dead

    def owner(path: str) -> int | None:
        try:
            with open(os.path.join(path, LAUNCHER_MARK)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None  # not a sweep's: left alone

    return remove_dead(os.path.join(tempfile.gettempdir(), "pymp-*"), owner)


# ----------------------------------------------------------------------------------------------- submitit
# SLURM job states after which a job runs no more (squeue's long names)
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "SPECIAL_EXIT", "TIMEOUT"}
# squeue's pending reasons that never clear by waiting: the job asks for what the partition or its nodes can
# never give (more CPUs or nodes than any node has, a time above the partition's limit, an account or QOS it
# may not use). A job pending for one of these is cancelled and its row fails at once, with the reason.
SLURM_NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                      "InvalidAccount", "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed",
                      "DependencyNeverSatisfied"}
PENDING_TIMEOUT_S = 24 * 3600.0  # --pending-timeout's default: a config queued longer than a day fails its row
FILE_GRACE_S = 5.0  # a job SLURM says has ended, whose exit-code file the shared filesystem has not shown yet
# squeue and scancel wait on the controller; one that does not answer (busy, restarting, a lost connection)
# must not freeze the sweep, above all its Ctrl-C: each call is bounded, and a late squeue counts as no answer
SLURM_CALL_TIMEOUT_S = 20.0


def slurm_call(argv: list[str]):
    """``argv`` (squeue, scancel) run with its output captured and SLURM_CALL_TIMEOUT_S to answer; None when
    the command did not answer in time."""
    import subprocess

    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=SLURM_CALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"bench: {argv[0]} did not answer within {SLURM_CALL_TIMEOUT_S:.0f} s (the SLURM controller is busy "
              f"or unreachable)", file=sys.stderr, flush=True)
        return None


class SlurmQueue:
    """Job states from ``squeue`` (one call per second at most, for every job of the sweep), not from submitit's
    ``sacct`` watcher: clusters without accounting are common, and there ``sacct`` fails, every job's state
    reads UNKNOWN and submitit prints two warnings per poll. ``squeue --states=all`` shows a job until
    ``MinJobAge`` (300 s by default) after it ends; a job it no longer shows has ended, and then the job's own
    exit-code file (``run_in_job``) is what says how."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.t = interval, -math.inf
        self.ids: set[str] = set()  # the sweep's jobs not yet ended
        self.asked: set[str] = set()  # the jobs the last squeue call was asked about
        self.states: dict[str, tuple[str, str]] = {}
        self.running: dict[str, set[str]] = {}  # node -> jobs seen running there
        self.most_per_node = 0  # the most configs seen running at once on one node

    def state(self, job_id: str) -> tuple[str, str] | None:
        """(state, reason) as squeue last showed the job, ("PENDING", "") before squeue was first asked about
        it, None once squeue no longer shows it."""
        self.ids.add(job_id)
        if time.monotonic() - self.t >= self.interval or job_id not in self.asked:
            self.refresh()
        if job_id not in self.asked:
            return "PENDING", ""
        return self.states.get(job_id)

    def forget(self, job_id: str) -> None:
        self.ids.discard(job_id)

    def refresh(self) -> None:
        self.t = time.monotonic()
        ids = sorted(self.ids)
        r = slurm_call(["squeue", "--noheader", "--states=all", "--format=%i|%T|%r|%N", f"--jobs={','.join(ids)}"])
        if r is None or (r.returncode != 0 and "Invalid job id" not in r.stderr):
            return  # the controller did not answer (busy, restarting): keep what it said last
        self.asked, self.states = set(ids), {}
        for line in r.stdout.splitlines() if r.returncode == 0 else []:
            job_id, state, reason, nodes = (line.split("|") + ["", "", ""])[:4]
            self.states[job_id] = (state.split()[0] if state else "UNKNOWN", reason)
            if state == "RUNNING" and nodes:
                for node in _expand_nodes(nodes):
                    self.running.setdefault(node, set()).add(job_id)
        for jobs in self.running.values():
            jobs.intersection_update(j for j, (s, _) in self.states.items() if s not in SLURM_ENDED)
            self.most_per_node = max(self.most_per_node, len(jobs))


def _expand_nodes(nodes: str) -> list[str]:
    """squeue's node list, compressed ("n[1-3],m") as scontrol expands it; one name unchanged."""
    if "[" not in nodes and "," not in nodes:
        return [nodes]
    import subprocess

    r = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=False)
    return r.stdout.split() or [nodes]


class SubmititJob(_Job):
    """One config as one submitit job (local processes or SLURM). The job runs ``llmopt.train`` (or, across
    nodes, torchrun on every node with c10d rendezvous on the first host) and writes, beside the config's
    metrics, when it started and its exit code; the files come back through the sweep directory, which a
    cluster must share between nodes. ``--timeout`` counts from the job's start, not its submission: time in
    the queue is the scheduler's, not the config's."""

    def __init__(self, executor, queue: SlurmQueue | None, sweep_pid: int | None, nproc_per_node: int,
                 pending_timeout: float, *args):
        super().__init__(*args)
        self.queue, self.pending_timeout, self.reason_said = queue, pending_timeout, ""
        base = self.metrics_path
        self.cancel_path, self.started_path, self.rc_path, self.peak_path = (
            base + ".cancel", base + ".started", base + ".rc", base + ".peak")
        for path in (self.cancel_path, self.started_path, self.rc_path, self.peak_path):
            if os.path.exists(path):
                os.remove(path)
        # on SLURM the job measures its node's peak FLOP/s for MFU (a CPU node; a GPU's is the datasheet's)
        sweep_dir = os.path.dirname(os.path.dirname(self.metrics_path))
        peak_cache = os.path.join(sweep_dir, "peak_flops") if queue is not None else None
        env = _job_env(self.env)
        if queue is not None:
            env.pop("OMP_NUM_THREADS", None)  # sized on the node, from the cores SLURM gave the job (run_in_job)
        self.job = executor.submit(run_in_job, self.argv, env, self.log_path, os.getcwd(), sweep_pid,
                                   nproc_per_node, self.cancel_path, self.entry, peak_cache)
        self.job_id = str(self.job.job_id)
        with open_file(self.log_path, "a") as log:
            log.write(f"# submitit job {self.job_id} ({type(executor).__name__})\n")
        self.run_t0: float | None = None  # when this sweep first saw the job's start file
        self.ended_t: float | None = None  # when the scheduler first said the job had ended

    def _stopped(self) -> tuple[bool, str]:
        """(the job runs no more, SLURM's last word on it: its state, or GONE once squeue no longer shows it)."""
        if os.path.exists(self.rc_path):
            return True, ""
        if self.queue is None:
            return self.job.done(), ""
        seen = self.queue.state(self.job_id)
        if seen is not None and seen[0] not in SLURM_ENDED:
            return False, seen[0]
        return True, seen[0] if seen is not None else "GONE"

    def poll(self) -> Outcome | None:
        now = time.monotonic()
        if self.run_t0 is None and os.path.exists(self.started_path):
            self.run_t0 = now
        if self.run_t0 is None and self.queue is not None:
            refused = self._pending(now)
            if refused is not None:
                return refused
        stopped, state = self._stopped()
        if stopped and state and self.queue is not None:
            # ended as SLURM tells it: the exit-code file may lag on a shared filesystem; give it a moment
            self.ended_t = self.ended_t or now
            stopped = now - self.ended_t > FILE_GRACE_S
        # the clock starts with the job; a local job is started at once, so it never waits for its start file
        t_start = self.run_t0 if self.run_t0 is not None or self.queue is not None else self.t0
        timed_out = not stopped and t_start is not None and now - t_start > self.timeout
        if not stopped and not timed_out:
            return None
        wall = now - (t_start if t_start is not None else self.t0)
        if timed_out:
            self.cancel()
            self._forget()
            return outcome_of(None, True, self.timeout, self.metrics_path, self.log_path, wall)
        rc, peak = _read_int(self.rc_path), _read_peak(self.peak_path)
        self._forget()
        if rc is not None:
            return replace(outcome_of(rc, False, self.timeout, self.metrics_path, self.log_path, wall), peak=peak)
        # no exit code: the job ended before its config did (the scheduler's limit, memory, a node, a cancel)
        if self.queue is None:
            exc = self.job.exception()
            state, why = str(self.job.state).upper(), (str(exc).strip().splitlines() or [""])[-1][:300] if exc else ""
        else:
            why = _last_line(self.job.stderr() or "")
        if "TIMEOUT" in state:
            return outcome_of(None, True, self.timeout, self.metrics_path, self.log_path, wall,
                              f"SLURM TIMEOUT (job {self.job_id}): the job's time limit was reached")
        rc = 128 + signal.SIGKILL if "OUT_OF_MEMORY" in state else 1
        said = ("left the queue with no exit code (no accounting to say how)" if state == "GONE"
                else f"ended {state}")
        reason = f"job {self.job_id} {said}" + (f": {why}" if why else "")
        with open_file(self.log_path, "a") as log:
            log.write(f"# {reason}\n")
        return outcome_of(rc, False, self.timeout, self.metrics_path, self.log_path, wall, reason)

    def _pending(self, now: float) -> Outcome | None:
        """A job still queued: its pending reason on the progress output each time it changes; a failed row,
        the job cancelled, when the reason can never clear or it has waited past --pending-timeout."""
        seen = self.queue.state(self.job_id)
        if seen is None or seen[0] != "PENDING":
            return None
        reason = seen[1] if seen[1] not in ("", "None", "(null)") else ""
        if reason and reason != self.reason_said:
            self.reason_said = reason
            print(f"bench: job {self.job_id} ({self.entry['config_id']}) pending: {reason}", flush=True)
        waited = now - self.t0
        if reason in SLURM_NEVER_STARTS:
            why = (f"job {self.job_id} can never start: SLURM says {reason} (it asks for more than the partition's "
                   f"nodes, limits or access allow); fix --cpus-per-node, --slurm-partition or --slurm-option")
        elif waited > self.pending_timeout:
            why = (f"job {self.job_id} still pending after {waited:.0f} s (--pending-timeout)"
                   + (f": SLURM says {reason}" if reason else ""))
        else:
            return None
        self.cancel()
        self._forget()
        with open_file(self.log_path, "a") as log:
            log.write(f"# {why}\n")
        return Outcome("failed", why, None, waited)

    def _forget(self) -> None:
        if self.queue is not None:
            self.queue.forget(self.job_id)
        for path in (self.cancel_path, self.started_path, self.rc_path, self.peak_path):
            if os.path.exists(path):
                os.remove(path)

    def cancel(self, wait_s: float = 30.0) -> None:
        """The cancel file stops the config within a second wherever it runs (a signal to submitit's local
        controller is lost when the sweep was started with SIGINT ignored); then the scheduler's cancel, and a
        wait until the job runs no more (a timed-out config's processes are gone before the next one starts;
        a Ctrl-C leaves no job in squeue)."""
        with open_file(self.cancel_path, "w"):
            pass
        try:
            if self.queue is not None:  # SLURM: scancel, bounded (submitit's cancel waits on it without a limit)
                slurm_call(["scancel", self.job_id])
            else:
                self.job.cancel(check=False)
        except Exception as e:  # the job may have ended meanwhile; say so, never hide a left-over job
            print(f"bench: could not cancel job {self.job_id}: {e}", file=sys.stderr)
        end = time.monotonic() + wait_s
        while not self._gone() and time.monotonic() < end:
            time.sleep(0.2)

    def _gone(self) -> bool:
        """The job runs no more. On SLURM, as squeue says: its exit-code file comes while the job is still
        COMPLETING (its processes being reaped), which squeue lists."""
        if self.queue is None:
            return self._stopped()[0]
        seen = self.queue.state(self.job_id)
        return seen is None or seen[0] in SLURM_ENDED


class RefusedJob:
    """A config whose job the scheduler refused at submission (sbatch's own error): a handle that yields its
    failed row at once, so the sweep goes on with the next config."""

    def __init__(self, outcome: Outcome, slot: Slot):
        self.outcome, self.slot = outcome, slot

    def poll(self) -> Outcome:
        return self.outcome

    def cancel(self) -> None:
        pass


def sbatch_message(error: Exception) -> str:
    """sbatch's own words from submitit's FailedJobError: its ``error:`` lines, without the prefix, once each."""
    said = []
    for line in str(error).splitlines():
        line = line.strip().removeprefix("sbatch: error:").strip()
        if line and line not in said:
            said.append(line)
    return "; ".join(said)[:500] or type(error).__name__


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _read_peak(path: str) -> tuple[float, str] | None:
    try:
        with open(path) as f:
            value, source = json.load(f)
        return float(value), str(source)
    except (OSError, ValueError, TypeError):
        return None


def _last_line(text: str) -> str:
    """The last non-blank line (submitit's job log: a traceback ends with its exception), or ""."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _job_env(env: dict) -> dict:
    """Only what differs from the submitting shell (SLURM nodes have their own environment)."""
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


# submitit asks SLURM for SIGUSR2 this long before the job's time limit (its default, 90 s, fired at once under
# a two-minute limit and ended the job as "timed out and not checkpointable"); the limit leaves room for it
# after llmopt's own --timeout, which is what decides, counted from the job's start like SLURM's limit.
SLURM_SIGNAL_DELAY_S = 60
SLURM_LIMIT_MARGIN_MIN = 2


def slurm_parameters(cfg: dict, device: str, timeout: float, settings: dict) -> dict:
    """submitit parameters for one config: nodes and GPUs from its world size, one task per node (llmopt's
    launcher or torchrun starts the ranks), a time limit above the harness's own timeout, its nodes to itself
    unless ``settings["share"]`` (timings taken beside another job are not the config's). ``settings``: the
    sweep's SLURM settings (``bench.run``: flags over the matrix's [slurm] table)."""
    world = world_size(cfg)
    params = {"timeout_min": int(math.ceil(timeout / 60)) + SLURM_LIMIT_MARGIN_MIN, "tasks_per_node": 1,
              "slurm_signal_delay_s": SLURM_SIGNAL_DELAY_S}
    if device == "cuda":
        gpus_per_node = settings.get("gpus_per_node") or 8
        per_node = min(world, gpus_per_node)
        if world % per_node:
            raise ExecutorError(f"config of {world} ranks does not fill nodes of {gpus_per_node} GPUs; "
                                f"use --gpus-per-node that divides it")
        params.update(nodes=world // per_node, gpus_per_node=per_node)
    else:
        params.update(nodes=1)
    if settings.get("cpus_per_node"):
        params["cpus_per_task"] = settings["cpus_per_node"]
    if not settings.get("share"):
        params["slurm_exclusive"] = True
    for key in ("partition", "account"):
        if settings.get(key):
            params[f"slurm_{key}"] = settings[key]
    if settings.get("options"):
        params["slurm_additional_parameters"] = dict(settings["options"])
    return params


def make_submitit_executor(kind: str, folder: str):
    try:
        import submitit
    except ImportError:
        raise ExecutorError(f"--executor {kind}: submitit is not installed; pip install submitit") from None
    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise ExecutorError("--executor slurm: no sbatch on PATH (not a SLURM login node?); run from one, or "
                                "use --executor submitit-local to run the same jobs here")
        return submitit.AutoExecutor(folder=folder, cluster="slurm")
    return submitit.LocalExecutor(folder=folder)


class Pool:
    """The sweep's executor and device slots: ``start(entry, slot)`` gives a polled job handle."""

    def __init__(self, executor: str, jobs: str, device: str, out_dir: str, timeout: float, warmup: int,
                 slurm: dict | None = None, pending_timeout: float = PENDING_TIMEOUT_S):
        self.executor, self.device, self.out_dir, self.timeout, self.warmup = executor, device, out_dir, timeout, warmup
        self.pending_timeout = pending_timeout
        self.jobs, n_gpus = resolve_jobs(jobs, executor, device)
        self.slurm = slurm or {}
        if executor == "slurm":  # the cluster places jobs; here only a bound on how many are in flight
            self.slots = Slots("cpu", self.jobs, pin=False)
        else:
            self.slots = Slots(device, self.jobs, n_gpus)
        self.local = executor != "slurm"  # the configs run on this machine (peaks can be measured here)
        # CPU configs sharing the machine: the report says so, and MFU is against each one's share of the cores
        self.concurrent_cpu = device == "cpu" and self.local and self.jobs > 1
        self._launcher = self._submitit = None
        if executor != "local" and ("%" in out_dir or not out_dir.isprintable()):
            # submitit and sbatch read % in a job's file paths as a pattern (%j: the job id), and a control
            # character would split a line of the job's script: refused, not rewritten
            raise ExecutorError(f"--out {out_dir!r}: --executor {executor} cannot use a directory whose path holds "
                                f"'%' or control characters; choose another --out")
        if executor != "local":  # a missing submitit or sbatch is said now, before the sweep writes anything
            self._submitit = make_submitit_executor(executor, os.path.join(out_dir, "submitit"))
        self.jobs_file = os.path.join(out_dir, "submitit", "jobs.jsonl")
        self.queue = SlurmQueue() if executor == "slurm" else None
        if executor == "slurm":
            cancel_leftovers(self.jobs_file)

    @property
    def shared_nodes(self) -> bool:
        """SLURM jobs allowed to share nodes (--slurm-share): their figures may have been taken side by side."""
        return self.executor == "slurm" and bool(self.slurm.get("share"))

    def describe(self) -> str:
        how = {"local": "", "submitit-local": " through submitit's local executor",
               "slurm": " as SLURM jobs"}[self.executor]
        if self.executor == "slurm":
            return how + f", up to {self.jobs} in flight" + (" (sharing nodes)" if self.shared_nodes else
                                                             ", each with its node(s) to itself")
        return how + (f", {self.jobs} at once" if self.jobs > 1 else "")

    def ready(self) -> None:
        """Start the local launcher, if it is needed and not running: outside ``signals_held``, since an exec'd
        process keeps the signal mask it was started with."""
        if self.executor == "local" and self._launcher is None:
            self._launcher = start_launcher()

    def start(self, entry: dict, slot: Slot):
        args = (entry, self.out_dir, self.timeout, self.warmup, slot)
        if self.executor == "local":
            self.ready()
            return LocalJob(self._launcher, *args)
        params = slurm_parameters(entry["config"], self.device, self.timeout, self.slurm)
        if self.executor == "submitit-local":
            params = {"timeout_min": params["timeout_min"]}
            if slot.gpus:
                params.update(gpus_per_node=len(slot.gpus), visible_gpus=list(slot.gpus))
        self._submitit.update_parameters(**params)
        from submitit.core.utils import FailedJobError

        ranks_per_node = world_size(entry["config"]) // params.get("nodes", 1)
        folder = os.path.join(self.out_dir, "submitit")
        before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        try:
            job = SubmititJob(self._submitit, self.queue, os.getpid() if self.executor == "submitit-local" else None,
                              ranks_per_node, self.pending_timeout, *args)
        except FailedJobError as e:  # sbatch refused it: this config's row fails, not the sweep
            for name in set(os.listdir(folder)) - before:  # the submission script and pickle it left
                os.remove(os.path.join(folder, name))
            why = f"sbatch refused the job: {sbatch_message(e)}"
            with open_file(os.path.join(self.out_dir, "logs", f"{entry['config_id']}.log"), "a") as log:
                log.write(f"# {why}\n")
            return RefusedJob(Outcome("failed", why, None, 0.0), slot)
        with open_file(self.jobs_file, "a") as f:  # what a resume after a SIGKILLed sweep must cancel
            f.write(json.dumps({"config_id": entry["config_id"], "job_id": str(job.job.job_id)}) + "\n")
        return job


# A SLURM job id as squeue and scancel print it: a number, an array task (123_4) or a heterogeneous part
# (123+0). Anything else read back from jobs.jsonl is refused before it can reach scancel as an option.
SLURM_JOB_ID_RE = re.compile(r"[0-9]+(_[0-9]+)?(\+[0-9]+)?")


def read_jobs_file(jobs_file: str) -> list[str]:
    """The job ids a sweep's ``submitit/jobs.jsonl`` lists (none when there is no file), each checked to be a
    SLURM job id: the file may come from someone else, and ``--name=victim`` would cancel another job."""
    if not os.path.exists(jobs_file):
        return []
    ids = []
    with open(jobs_file, errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                job_id = json.loads(line)["job_id"]
            except (ValueError, KeyError, TypeError) as e:
                raise ExecutorError(f"{jobs_file}, line {n}: not a job record ({e}); remove the line (or the file, "
                                    f"after cancelling its jobs yourself) and --resume again") from None
            if not isinstance(job_id, str) or not SLURM_JOB_ID_RE.fullmatch(job_id):
                raise ExecutorError(f"{jobs_file}, line {n}: job_id {job_id!r} is not a SLURM job id; remove the "
                                    f"line and --resume again")
            ids.append(job_id)
    return ids


def cancel_leftovers(jobs_file: str, wait_s: float = 120.0) -> None:
    """SLURM jobs an earlier, killed run of this sweep left queued or running: cancelled, and waited for until
    squeue shows them ended, before the resume submits their configs again (one still running would write its
    metrics over the new attempt's)."""
    ids = read_jobs_file(jobs_file)
    if ids:  # scancel ignores jobs that have ended
        slurm_call(["scancel", *ids])
        print(f"bench: scancel sent for the {len(ids)} job(s) an earlier run of this sweep submitted", flush=True)
        queue, end = SlurmQueue(interval=0.5), time.monotonic() + wait_s
        left = set(ids)
        queue.ids.update(left)  # one squeue call for all of them
        while left and time.monotonic() < end:
            left = {j for j in left if (s := queue.state(j)) is not None and s[0] not in SLURM_ENDED}
            if left:
                time.sleep(0.5)
        if left:
            print(f"bench: job(s) {', '.join(sorted(left))} still not ended {wait_s:.0f} s after scancel; their "
                  f"configs run again regardless", file=sys.stderr, flush=True)
    if os.path.exists(jobs_file):
        os.remove(jobs_file)
