"""What runs inside a submitit job (``--executor submitit-local`` or ``slurm``) before and after its config:
``ConfigJob``. The job unpickles it by reference, so this module imports no torch (nor anything that does):
a config's ``llmopt.train`` imports torch itself, and the job's wrapper doing so too cost each job a second
import before its config could start.

Preemption. A SLURM job is stopped early in two ways, and both end in a requeue that resumes the config from
its checkpoint (the sweep gives every SLURM config a ``--checkpoint-dir``):

* before its time limit SLURM sends SIGUSR2 (``--signal=USR2@S``) to every process of the job. submitit's
  handler in this wrapper calls ``ConfigJob.checkpoint``, which passes the signal on to the config, waits for
  it to stop after the step under way with a checkpoint (exit code ``cli.PREEMPTED``), and hands submitit the
  same call to requeue (``scontrol requeue``); the next start of the job resumes from the checkpoint.
* ``scontrol requeue``, a preemption (PreemptMode=REQUEUE) or ``scancel`` send SIGTERM to every process (and
  SIGKILL after KillWait): the config stops the same way, this wrapper writes no exit code, and SLURM either
  starts the job again (requeued) or reports it ended (cancelled), which is what the sweep then reads.
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import time

from llmopt.core import cli
from llmopt.core.config import TrainConfig
from llmopt.core.run_metrics import read_metrics
from llmopt.launch import LAUNCH_T0_ENV, die_with_parent, node_name
from llmopt.safe_files import open_file, replace_text

STOP_RESEND_S = 2.0  # the stop signal is sent again this often until the config has stopped (it may not yet
# have installed its handler when the first one came: until then it ignores SIGUSR2, see _child_setup)


def rendezvous_port(job_id: str) -> int:
    """The c10d rendezvous port of a job spanning nodes: one per job, so that jobs sharing a node do not meet on
    one port (torchrun's default, 29500, is what a second job would collide on)."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 29500 + int(digits) % 20000


def node_rc_path(metrics_path: str, node: int) -> str:
    """Where node ``node`` (1 and up) of a config across nodes writes its exit code when its ranks failed."""
    return f"{metrics_path}.node{node}.rc"


class ConfigJob:
    """The call a submitit job runs (``__call__``: mark the start, run the config with its output into the
    config's log, write its exit code) and what submitit calls on SLURM's stop signal (``checkpoint``). It stops
    the config when ``cancel_path`` appears (the sweep cancelled it) or, with ``sweep_pid`` (submitit-local),
    when the sweep is gone, as a local config does. With ``peak_cache`` (SLURM: a directory holding
    ``<node>.json`` per node; the sweep's path is never a format string, so braces in ``--out`` are plain
    characters) the peak FLOP/s the row's MFU is stated against is taken here, on the node the config ran on,
    once per node and dtype for the whole sweep. ``stop_wait_s``: how long a config stopping for a requeue may
    take to write its checkpoint (less than the time between SLURM's signal and its limit)."""

    def __init__(self, stop_wait_s: float = 45.0):
        self.stop_wait_s = stop_wait_s
        self.proc = None       # the running config (this job's run only: never pickled)
        self.finish_args = None
        self.finished = False
        self.terminating = False  # SLURM sent SIGTERM: the job is being requeued, preempted or cancelled

    def __getstate__(self):
        return {"stop_wait_s": self.stop_wait_s}

    def __setstate__(self, state):
        self.__init__(state["stop_wait_s"])

    def __call__(self, argv: list[str], env: dict, log_path: str, cwd: str, sweep_pid: int | None,
                 nproc_per_node: int = 1, cancel_path: str | None = None, config: TrainConfig | None = None,
                 peak_cache: str | None = None) -> int:
        import socket
        import subprocess
        import threading

        import submitit

        job_env = submitit.JobEnvironment()
        metrics_path = argv[argv.index("--metrics-out") + 1]
        first = job_env.global_rank == 0  # across nodes, the first node's task speaks for the job
        t_start = time.time()
        requeues = int(os.environ.get("SLURM_RESTART_COUNT") or 0)  # SLURM's count of this job's requeues
        if first:  # the files the sweep polls for appear whole (renamed into place), never half-written
            replace_text(metrics_path + ".started", f"{socket.gethostname()} {t_start} {requeues}\n")
        cmd = [sys.executable, "-m", "llmopt.train", *argv]
        if job_env.num_nodes > 1:
            host = os.environ.get("SLURM_LAUNCH_NODE_IPADDR") or job_env.hostnames[0]  # the first node's
            cmd += ["--nnodes", str(job_env.num_nodes), "--node-rank", str(job_env.node),
                    "--rdzv-endpoint", f"{host}:{rendezvous_port(str(job_env.job_id))}",
                    "--rdzv-id", str(job_env.job_id)]
        env = dict(os.environ, **env)
        # start-up counts from the job's start, as --timeout does: time queued is the scheduler's, not the config's
        env[LAUNCH_T0_ENV] = repr(t_start)
        if peak_cache:  # SLURM: this node's cores (the job's allocation) split between its ranks, as locally
            env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc_per_node))
        self.finish_args = (first, metrics_path, config, peak_cache, job_env.node)
        if job_env.cluster == "slurm":  # SLURM ending the job (requeue, preemption, scancel): see the end
            signal.signal(signal.SIGTERM, self._terminating)
        with open_file(log_path, "a") as log:
            log.write(f"# job {job_env.job_id} running on {node_name()}, OMP_NUM_THREADS="
                      f"{env.get('OMP_NUM_THREADS', '(unset)')}" + (f", requeued {requeues} time(s)" if requeues
                                                                     else "") + "\n")
            log.flush()
            # its own process group: the stop signal is passed on to the config and its ranks at once
            self.proc = proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, preexec_fn=_child_setup, process_group=0)

            def watch():
                while proc.poll() is None:
                    if cancel_path and os.path.exists(cancel_path):
                        proc.kill()  # its ranks follow (PR_SET_PDEATHSIG)
                        return
                    if sweep_pid:
                        try:
                            os.kill(sweep_pid, 0)
                        except ProcessLookupError:
                            proc.kill()
                            return
                    time.sleep(0.5)

            threading.Thread(target=watch, daemon=True).start()
            try:
                rc = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if rc == cli.PREEMPTED and job_env.cluster == "slurm" or self.terminating:
            # stopped by SLURM, with a checkpoint (or before the config could take one): requeued, the job starts
            # again and resumes; cancelled, SLURM says so. Either way no exit code: it would end the row as failed
            return rc
        self._finish(rc)
        gc.freeze()  # the job's process exits next: as llmopt.core.cli.exit, its shutdown skips what the peak imported
        return rc

    def _terminating(self, signum, frame) -> None:
        """SIGTERM from SLURM: the config got it too and stops (with a checkpoint when it has its handler)."""
        self.terminating = True

    def _finish(self, rc: int) -> None:
        """The node's peak FLOP/s (SLURM) and the exit-code file, once; SLURM's stop signal waits meanwhile."""
        if self.finished:
            return
        self.finished = True
        first, metrics_path, config, peak_cache, node = self.finish_args
        if not first:  # another node of a config across nodes: only a failure is said, so the row ends at once
            if rc != 0:
                replace_text(node_rc_path(metrics_path, node), f"{rc}\n")
            return
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        try:
            if rc == 0 and peak_cache and config is not None:
                import socket

                metrics, _ = read_metrics(metrics_path)  # unreadable: the sweep reads it again and says so
                if metrics is not None:
                    from bench.hardware import measure_node_peak  # SLURM only; torch only for a measurement

                    measure_node_peak(config, metrics, metrics_path,
                                      os.path.join(peak_cache, f"{socket.gethostname()}.json"))
            replace_text(metrics_path + ".rc", f"{rc}\n")  # last: the sweep takes the job as ended once it exists
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def checkpoint(self, *args, **kwargs):
        """submitit's SIGUSR2 handler calls this on the first node (SLURM's signal before the time limit): the
        config is asked to stop with a checkpoint, and the same call is returned for submitit to requeue.
        A config that ended by itself meanwhile keeps its exit code and is not requeued (None)."""
        from submitit.helpers import DelayedSubmission

        again = DelayedSubmission(ConfigJob(self.stop_wait_s), *args, **kwargs)
        proc = self.proc
        if self.finished:
            return None
        if proc is None:  # the config has not started: nothing to save, the next job starts it
            return again
        rc = _stop(proc, self.stop_wait_s)
        if rc is None or rc == cli.PREEMPTED:  # checkpointed, or too slow to (its last checkpoint stands)
            return again
        self._finish(rc)
        return None


def _child_setup() -> None:
    """In the config's process before it starts: it dies with this wrapper, and ignores SLURM's SIGUSR2 until
    llmopt.train installs its own handler (``llmopt.dcp.StopRequest``; the default would end it at once)."""
    die_with_parent()
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _stop(proc, wait_s: float) -> int | None:
    """SIGUSR2 to the config's process group until it exits, for up to ``wait_s``; its exit code, or None when
    it had to be killed. Called from a signal handler while the main thread waits on the process, so it never
    reaps it (``WNOWAIT``): the main thread's wait does, and reads the same code."""
    end, sent = time.monotonic() + wait_s, 0.0
    while time.monotonic() < end:
        rc = _exit_code(proc)
        if rc is not None:
            return rc
        if time.monotonic() - sent >= STOP_RESEND_S:
            sent = time.monotonic()
            try:
                os.killpg(proc.pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return None


def _exit_code(proc) -> int | None:
    """The process's exit code (a signal as a negative number) if it has exited, without reaping it."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped meanwhile (the watch thread's poll)
        return proc.returncode
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
