"""``--executor local``: each config a process forked from the sweep's pre-imported launcher (a
multiprocessing forkserver, ``bench.executors.forkserver``), in a session of its own, killed as a group."""
from __future__ import annotations

import os
import signal
import sys
import time

from bench.executors.common import Job, Outcome, outcome_of


class LocalJob(Job):
    """One config as a process forked from the sweep's pre-imported launcher, in a session of its own.
    Create it with the stop signals blocked (``signals_held``): a SIGTERM between the fork and the caller
    holding this handle would leave a config nobody kills."""

    def __init__(self, launcher, *args, **kw):
        super().__init__(*args, **kw)
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


# The sweep's PID, for its launcher (bench.executors.forkserver) to die with it. Here, not there: importing
# bench.executors.forkserver imports what every rank needs, which the sweep's own process never should.
SWEEP_PID_ENV = "LLMOPT_SWEEP_PID"


def start_forkserver():
    """The sweep's pre-imported launcher: a forkserver that has imported what a config's ranks need. It returns
    at once; the launcher's imports go on beside this process until its first config is started."""
    import multiprocessing

    os.environ[SWEEP_PID_ENV] = str(os.getpid())  # read by bench.executors.forkserver in the forkserver
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["bench.executors.forkserver", "llmopt.train", "bench.executors"])
    from multiprocessing import forkserver

    forkserver.ensure_running()  # now, with no signal blocked (an exec'd process keeps its parent's mask)
    _mark_forkserver_dir()
    return ctx


# multiprocessing keeps the launcher's socket in a directory of its own (<tmp>/pymp-*), removed at a clean exit
# only. This file, written into it, names the sweep that owns it, so the next sweep removes it after a SIGKILL.
FORKSERVER_MARK = "llmopt-sweep.pid"


def _mark_forkserver_dir() -> None:
    from multiprocessing import util

    with open(os.path.join(util.get_temp_dir(), FORKSERVER_MARK), "w") as f:
        f.write(str(os.getpid()))


def remove_dead_forkserver_dirs() -> list[str]:
    """Launcher directories of sweeps that are gone (killed before multiprocessing could remove them)."""
    import tempfile

    from llmopt.scratch import remove_dead

    def owner(path: str) -> int | None:
        try:
            with open(os.path.join(path, FORKSERVER_MARK)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None  # not a sweep's: left alone

    return remove_dead(os.path.join(tempfile.gettempdir(), "pymp-*"), owner)


