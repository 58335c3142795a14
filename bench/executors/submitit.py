"""``--executor submitit-local`` and ``slurm``: a config as a submitit job (the job wrapper,
``bench.executors.job``, runs it), polled through the SLURM queue or submitit's own state, and a job sbatch
refused as a failed row."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import replace

from bench.executors.common import ExecutorError, Job, Outcome, Slot, outcome_of, status_of
from bench.executors.job import ConfigJob, node_rc_path
from bench.executors.slurm import MAX_REQUEUES, SLURM_ENDED, SLURM_NEVER_STARTS, SlurmQueue, slurm_call
from llmopt.safe_files import open_file

FILE_GRACE_S = 5.0  # a job SLURM says has ended, whose exit-code file the shared filesystem has not shown yet
NODE_GRACE_S = 3.0  # across nodes, after one node's failure: how long the others get to say theirs


class SubmititJob(Job):
    """One config as one submitit job (local processes or SLURM). The job runs ``llmopt.train`` (across nodes,
    ``llmopt.train --nnodes`` on every node: torch's elastic agent, c10d rendezvous on the first) and writes,
    beside the config's metrics, when it started and its exit code; the files come back through the sweep
    directory, which a cluster must share between nodes. ``--timeout`` counts from the job's start, not its
    submission: time in the queue is the scheduler's, not the config's. A job SLURM requeues (preempted, or
    stopped before its time limit: ``bench.executors.job``) starts again and resumes its config from its
    checkpoint; its clock restarts with it, its wall time counts from its first start, and its row says how many
    times it was requeued."""

    def __init__(self, executor, queue: SlurmQueue | None, sweep_pid: int | None, nproc_per_node: int,
                 pending_timeout: float, stop_wait_s: float, max_requeues: int, *args, **kw):
        super().__init__(*args, **kw)
        self.queue, self.pending_timeout, self.reason_said = queue, pending_timeout, ""
        self.max_requeues = max_requeues
        base = self.metrics_path
        self.cancel_path, self.started_path, self.rc_path, self.peak_path = (
            base + ".cancel", base + ".started", base + ".rc", base + ".peak")
        # across nodes, the others say only a failure (their ranks died): the row ends at once, the job cancelled
        self.node_rc_paths = [node_rc_path(base, k) for k in range(1, self.entry.config.world_size // nproc_per_node)]
        for path in self._files():
            if os.path.exists(path):
                os.remove(path)
        # on SLURM the job measures its node's peak FLOP/s for MFU (a CPU node; a GPU's is the datasheet's)
        sweep_dir = os.path.dirname(os.path.dirname(self.metrics_path))
        peak_cache = os.path.join(sweep_dir, "peak_flops") if queue is not None else None
        env = _job_env(self.env)
        if queue is not None:
            env.pop("OMP_NUM_THREADS", None)  # sized on the node, from the cores SLURM gave the job (ConfigJob)
        self.job = executor.submit(ConfigJob(stop_wait_s), self.argv, env, self.log_path, os.getcwd(), sweep_pid,
                                   nproc_per_node, self.cancel_path, self.entry.config, peak_cache)
        self.job_id = str(self.job.job_id)
        with open_file(self.log_path, "a") as log:
            log.write(f"# submitit job {self.job_id} ({type(executor).__name__})\n")
        self.first_t0: float | None = None  # when this sweep first saw the job's start file
        self.run_t0: float | None = None  # ... and its latest (a requeued job starts again): --timeout counts from it
        self.started = ""  # the start file as last read: "host epoch-seconds requeues"
        self.requeues = 0  # how many times SLURM requeued the job (preempted, or stopped before its time limit)
        self.ended_t: float | None = None  # when the scheduler first said the job had ended
        self.failed_t: float | None = None  # when a node of a config across nodes first said it failed

    def _files(self) -> list[str]:
        return [self.cancel_path, self.started_path, self.rc_path, self.peak_path, *self.node_rc_paths]

    def _exit_codes(self) -> list[int]:
        return [rc for rc in map(_read_int, (self.rc_path, *self.node_rc_paths)) if rc is not None]

    def _exit_code(self) -> int | None:
        """The config's exit code, None before any node has said one. Across nodes, where several failed, a
        SIGKILLed or out-of-memory rank's (what the others then failed of), else the first failure's."""
        codes = self._exit_codes()
        failed = [rc for rc in codes if rc != 0]
        if not failed:
            return codes[0] if codes else None
        return next((rc for rc in failed if status_of(rc, False) == "oom"), failed[0])

    def _nodes_said(self, now: float) -> bool:
        """Across nodes: every node that will say has said (each one whose ranks failed writes its code, the
        first node always), or NODE_GRACE_S have passed since the first failure, so that the row's status and
        error are the failure's cause, not a node that lost its peers."""
        codes = self._exit_codes()
        if not self.node_rc_paths or len(codes) == 1 + len(self.node_rc_paths) or not any(codes):
            return True
        self.failed_t = self.failed_t or now
        return now - self.failed_t >= NODE_GRACE_S

    def _stopped(self) -> tuple[bool, str]:
        """(the job runs no more, SLURM's last word on it: its state, or GONE once squeue no longer shows it)."""
        if any(os.path.exists(p) for p in (self.rc_path, *self.node_rc_paths)):
            return True, ""
        if self.queue is None:
            return self.job.done(), ""
        seen = self.queue.state(self.job_id)
        if seen is not None and seen[0] not in SLURM_ENDED:
            return False, seen[0]
        return True, seen[0] if seen is not None else "GONE"

    def poll(self) -> Outcome | None:
        outcome = self._poll()
        return None if outcome is None else replace(outcome, requeues=self.requeues)

    def _read_start(self, now: float) -> None:
        """A new start of the job (its first, or after a requeue): its clock restarts, its requeues counted."""
        try:
            with open(self.started_path) as f:
                started = f.read()
        except OSError:
            return
        if started and started != self.started:
            self.started, self.run_t0 = started, now
            self.first_t0 = self.first_t0 or now
            fields = started.split()
            self.requeues = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0

    def _poll(self) -> Outcome | None:
        now = time.monotonic()
        self._read_start(now)
        if self.run_t0 is None and self.queue is not None:
            refused = self._pending(now)
            if refused is not None:
                return refused
        if self.requeues > self.max_requeues:
            why = (f"job {self.job_id} requeued {self.requeues} times, more than --max-requeues {self.max_requeues} "
                   f"(preempted or stopped at its time limit each time); raise --slurm-time-limit or --max-requeues")
            self.cancel()
            self._forget()
            with open_file(self.log_path, "a") as log:
                log.write(f"# {why}\n")
            return Outcome("failed", why, None, now - (self.first_t0 or self.t0))
        stopped, state = self._stopped()
        if stopped and not state and not self._nodes_said(now):
            return None
        if stopped and state and self.queue is not None:
            # ended as SLURM tells it: the exit-code file may lag on a shared filesystem; give it a moment
            self.ended_t = self.ended_t or now
            stopped = now - self.ended_t > FILE_GRACE_S
        # the clock starts with the job; a local job is started at once, so it never waits for its start file
        t_start = self.run_t0 if self.run_t0 is not None or self.queue is not None else self.t0
        # a requeued job waiting to start again is the scheduler's time, as its first wait in the queue was
        timed_out = not stopped and t_start is not None and now - t_start > self.timeout and state != "PENDING"
        if not stopped and not timed_out:
            return None
        wall = now - (self.first_t0 if self.first_t0 is not None else t_start if t_start is not None else self.t0)
        if timed_out:
            self.cancel()
            self._forget()
            return outcome_of(None, True, self.timeout, self.metrics_path, self.log_path, wall)
        rc, peak = self._exit_code(), _read_peak(self.peak_path)
        if rc is not None:
            outcome = replace(outcome_of(rc, False, self.timeout, self.metrics_path, self.log_path, wall), peak=peak)
            if rc != 0 and self.queue is not None and self.entry.config.world_size > 1:
                slurm_call(["scancel", self.job_id])  # across nodes, the others' ranks may still wait for the lost one
            self._forget()
            return outcome
        self._forget()
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
            print(f"bench: job {self.job_id} ({self.entry.config_id}) pending: {reason}", flush=True)
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
        for path in self._files():
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

    def drop_checkpoints(self) -> None:
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




def make_submitit_executor(kind: str, folder: str, max_requeues: int = MAX_REQUEUES):
    try:
        import submitit
    except ImportError:
        raise ExecutorError(f"--executor {kind}: submitit is not installed; pip install submitit") from None
    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise ExecutorError("--executor slurm: no sbatch on PATH (not a SLURM login node?); run from one, or "
                                "use --executor submitit-local to run the same jobs here")
        # submitit requeues a job stopped at its time limit this many times (a preemption it always requeues;
        # SubmititJob fails a row requeued more than --max-requeues times either way)
        return submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues)
    return submitit.LocalExecutor(folder=folder)

