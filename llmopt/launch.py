"""Starting a config's local ranks: forked from this process on CPU, torch's elastic launcher on CUDA.

``python -m llmopt.train --dp 2`` (no torchrun) starts its own ranks here. Each rank of an exec'd launcher
imports torch, DTensor, pipelining and dynamo again (seconds a rank; on 2 cores with 4 ranks, the imports of a
small config cost more than its steps). On CPU the ranks are instead ``os.fork()``-ed from this process after
it has imported the modules a rank needs and before it has run a single torch op (so no OpenMP pool or other
thread exists to be copied half-way). On CUDA forking is unsafe once the driver has been touched, and the
import cost is small beside a GPU step, so CUDA ranks keep torch's elastic launcher, as under ``torchrun``.

Both paths give a rank the same environment torchrun does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT),
rendezvous through a c10d TCPStore this process hosts on a free port, stop every rank when one fails, and
report the rank that failed first for a reason of its own (``root_cause``).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass

from llmopt.core import cli
from llmopt.scratch import private_dir

# Modules every rank imports: loaded once in the forking process so that forked ranks start with them.
RANK_MODULES = ("torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.tensor.parallel",
                "torch.distributed.pipelining", "torch.distributed.fsdp", "torch._dynamo",
                "torch.distributed._tools.mem_tracker", "llmopt.step", "llmopt.instruments", "llmopt.memory",
                "llmopt.convergence", "llmopt.distributed.parallelize")
# Environment variable a harness may set to choose the launcher: "fork" or "elastic" (default: by device).
LAUNCHER_ENV = "LLMOPT_LAUNCHER"
# Epoch seconds when the config was started (set by the harness, else at llmopt.train's entry): start-up is
# measured from it to the rank's first line of work (llmopt.loop), so it covers imports and rank start-up.
LAUNCH_T0_ENV = "LLMOPT_LAUNCH_T0"
# Errors a rank raises because *another* rank went away: never the root cause when a real error exists.
SECONDARY_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                    "communicator was aborted", "Socket Timeout", "SIGTERM")
# Set in the ranks this module starts: the launcher already checked the run's outputs and holds its checkpoint
# directory's lock (under torchrun, rank 0 does both itself).
LAUNCHED_ENV = "LLMOPT_LAUNCHED"
RANKS_DIR = "llmopt-ranks-"  # <tmp>/llmopt-ranks-<launcher pid>-...: the ranks' error files or the agent's logs
GRACE_S = 1.0  # after the first failure, how long the other ranks get to fail (and say why) on their own


def under_launcher() -> bool:
    """Whether this process is a rank a launcher started (this module's, torchrun, torch's elastic agent)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def preload() -> None:
    """Import what a rank needs; never runs a torch op (a forked child must not inherit a thread pool)."""
    import importlib

    for name in RANK_MODULES:
        importlib.import_module(name)


@dataclass(frozen=True)
class Nodes:
    """A run across nodes (llmopt.train --nnodes): this node's place in it and where node 0's agent hosts the
    c10d rendezvous."""
    count: int
    rank: int
    endpoint: str
    run_id: str


def node_name() -> str:
    """This node as SLURM names it (the name a user finds in squeue and sinfo), else its host name."""
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def launch(nproc: int, argv: list[str], device: str, rank_main, oom_exit: int = cli.OUT_OF_MEMORY,
           decided: tuple[int, ...] = (), graceful: bool = False, nodes: Nodes | None = None) -> int:
    """Run ``rank_main(argv)`` on ``nproc`` local ranks; returns the exit code the launcher should give
    (``oom_exit`` when a rank was SIGKILLed: nobody here sent it, so it was the kernel's OOM killer).
    ``decided``: exit codes every rank reaches alike and rank 0 explains itself (a divergence, a user error
    found once training started): when every failed rank, rank 0 among them, exits with one of them, the
    launcher adds no "rank N failed" line of its own. ``graceful`` (the run checkpoints): SIGTERM and SIGUSR2
    are passed on to the ranks, which stop after the step under way with a checkpoint
    (``llmopt.dcp.StopRequest``), and waited for; a second SIGTERM (a rank stuck in a collective never reaches
    the end of its step) and SIGHUP stop them at once, as SIGTERM does without ``graceful``.
    ``nodes``: this node's ``nproc`` ranks of a run across nodes, through torch's elastic agent (torchrun's)."""
    how = "elastic" if nodes else os.environ.get(LAUNCHER_ENV) or ("fork" if device == "cpu" else "elastic")
    if how not in ("fork", "elastic"):
        return cli.error(f"{LAUNCHER_ENV}={how!r}: use fork or elastic")
    if how == "fork" and device != "cpu":
        return cli.error(f"{LAUNCHER_ENV}=fork: CUDA ranks cannot be forked safely; use elastic")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    launched = os.environ.get(LAUNCHED_ENV)
    os.environ[LAUNCHED_ENV] = "1"  # inherited by forked and exec'd ranks alike; this process's restored below
    if graceful and how == "fork":
        _PASSED.clear()
        handlers = {signal.SIGTERM: _pass_on, signal.SIGHUP: _raise_exit, signal.SIGUSR2: _pass_on}
    elif graceful:  # torch's agent stops its ranks on SIGTERM (after a grace); SIGUSR2 reaches them from SLURM
        handlers = {signal.SIGTERM: _raise_exit, signal.SIGHUP: _raise_exit, signal.SIGUSR2: signal.SIG_IGN}
    else:
        # SIGTERM and SIGHUP unwind like Ctrl-C, so the ranks are stopped and the launcher's files removed on
        # the way out (by default they end the process at once and leave both behind)
        handlers = {signal.SIGTERM: _raise_exit, signal.SIGHUP: _raise_exit}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        code = _forked(nproc, argv, rank_main, decided) if how == "fork" else _elastic(nproc, argv, decided, nodes)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if launched is None:
            os.environ.pop(LAUNCHED_ENV, None)
    return oom_exit if code == -9 else code


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


_RANKS: dict[int, int] = {}  # the forked ranks still running: pid -> rank (for _pass_on)
_PASSED: set[int] = set()  # the stop signals a graceful launcher has passed on


def _pass_on(signum, frame):
    """A graceful launcher's stop signal, passed on to its ranks (SLURM signals them too: twice is once); the
    same signal again from someone else stops them at once."""
    if signum == signal.SIGTERM and signum in _PASSED:
        raise SystemExit(128 + signum)
    _PASSED.add(signum)
    for pid in list(_RANKS):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _elastic(nproc: int, argv: list[str], decided: tuple[int, ...], nodes: Nodes | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logs = private_dir(RANKS_DIR)  # the agent's files, removed afterwards (or by the next run, after a SIGKILL)
    where = dict(min_nodes=1, max_nodes=1, run_id=f"llmopt-{uuid.uuid4().hex[:8]}", rdzv_endpoint="localhost:0")
    if nodes is not None:  # node 0 hosts the rendezvous's store: said, not guessed from host names
        where = dict(min_nodes=nodes.count, max_nodes=nodes.count, run_id=nodes.run_id, rdzv_endpoint=nodes.endpoint,
                     rdzv_configs={"is_host": nodes.rank == 0})
    config = LaunchConfig(nproc_per_node=nproc, rdzv_backend="c10d", max_restarts=0, monitor_interval=0.2,
                          logs_specs=DefaultLogsSpecs(log_dir=logs), **where)
    try:
        elastic_launch(config, sys.executable)("-m", "llmopt.train", *argv)
    except ChildFailedError as e:
        return _report(e.failures, decided, node_name() if nodes is not None else None)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return 0


def _forked(nproc: int, argv: list[str], rank_main, decided: tuple[int, ...]) -> int:
    """Fork the ranks, then host their rendezvous store (created after the fork: its server thread stays here),
    hand each rank the store's port through a pipe, and wait, stopping all ranks when one fails."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    preload()
    errors = private_dir(RANKS_DIR)  # each rank's error file (torch elastic's @record)
    try:
        failures = _fork_and_wait(nproc, argv, rank_main, errors)
        if not failures:
            return 0
        return _report({rank: ProcessFailure(rank, pid, code, os.path.join(errors, f"{rank}.json"))
                        for pid, (rank, code) in failures.items()}, decided)
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def _fork_and_wait(nproc: int, argv: list[str], rank_main, errors: str) -> dict[int, tuple[int, int]]:
    from torch.distributed import TCPStore

    sys.stdout.flush()
    sys.stderr.flush()
    pids, pipes = {}, {}
    for rank in range(nproc):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the rank: only its own pipe's read end, so a launcher's death is EOF to every rank
            for fd in (w, *pipes.values()):
                os.close(fd)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2):  # a rank's own (see launch)
                signal.signal(sig, signal.SIG_DFL)
            _rank(rank, nproc, r, os.path.join(errors, f"{rank}.json"), argv, rank_main)
        os.close(r)
        pids[pid], pipes[rank] = rank, w
        _RANKS[pid] = rank
    try:
        store = TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False)
        for w in pipes.values():
            os.write(w, f"{store.port}\n".encode())
            os.close(w)
        return _wait(pids)
    except BaseException:  # Ctrl-C or SIGTERM of the launcher: no rank outlives it
        _stop(pids)
        raise
    finally:
        _RANKS.clear()
        for w in pipes.values():
            try:
                os.close(w)
            except OSError:
                pass


def _rank(rank: int, nproc: int, port_fd: int, error_file: str, argv: list[str], rank_main) -> None:
    """A forked rank: torchrun's environment, one OpenMP thread pool of its own size, then the rank's main."""

    def body() -> int:
        # TORCHELASTIC_USE_AGENT_STORE: torch's env:// rendezvous then connects every rank, rank 0 included, as
        # a client of the store the launcher hosts (torch elastic's own contract with its ranks; an environment
        # variable rather than a documented API, so every multi-rank CPU test depends on it)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                          MASTER_ADDR="127.0.0.1", TORCHELASTIC_USE_AGENT_STORE="True",
                          TORCHELASTIC_ERROR_FILE=error_file)
        with os.fdopen(port_fd) as f:
            port = f.readline().strip()
        if not port:  # the launcher died before the store existed
            return 1
        os.environ["MASTER_PORT"] = port
        forked_threads()
        return rank_main(argv)

    exit_after(body)


def forked_threads() -> None:
    """Size this process's OpenMP pool from OMP_NUM_THREADS (or the cores it may use): torch read the variable
    when it loaded, which in a forked process was before the fork."""
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))))


def exit_after(body) -> None:
    """Run a forked child's ``body()`` (it returns the exit code) and leave with ``os._exit`` whatever it
    raises: a child never returns into its parent's frames."""
    code = 1
    try:
        code = body()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pids: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Reap the ranks; at the first failure give the others GRACE_S to fail on their own, then stop them.
    Returns {pid: (rank, exit code)} of the ranks that failed by themselves (signals as negative codes)."""
    alive, failures, deadline = dict(pids), {}, None
    while alive:
        pid, status = os.waitpid(-1, os.WNOHANG) if deadline else os.waitpid(-1, 0)
        if pid == 0:
            if time.monotonic() > deadline:
                _stop(alive)
                break
            time.sleep(0.02)
            continue
        if pid not in alive:
            continue
        rank = alive.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            failures[pid] = (rank, code)
            deadline = deadline or time.monotonic() + GRACE_S
    return failures


def _stop(alive: dict[int, int]) -> None:
    """SIGTERM, then SIGKILL after a few seconds, and reap: no rank is left behind."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while alive and time.monotonic() < end:
            for pid in list(alive):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    alive.pop(pid)
            time.sleep(0.02)
        if not alive:
            return


def _report(failures: dict, decided: tuple[int, ...] = (), node: str | None = None) -> int:
    """The failure's one line; ``node``: this node's name, in a run across nodes (each node's agent reports
    its own ranks, so the line says where)."""
    codes = {f.exitcode for f in failures.values()}
    if (0 in failures or node is not None) and len(codes) == 1 and codes <= set(decided):
        return codes.pop()  # every rank decided alike (diverged, say): rank 0, on whichever node, says why
    rank, line, code = root_cause(failures)
    if code == -9:
        line = f"killed by SIGKILL (the kernel's OOM killer?): {line}"
    return cli.error(f"rank {rank}{f' on node {node}' if node else ''} failed: {line}", code)


def root_cause(failures: dict) -> tuple[int, str, int]:
    """(rank, last error line, exit code) of the rank that failed first for a reason of its own; ``failures``
    maps rank -> torch elastic's ProcessFailure, in the order the ranks were seen to fail. A code of -9 is a
    SIGKILL nobody here sent. A rank that left no error file (killed by a signal, or a script without torch
    elastic's ``@record``) is timed when its ProcessFailure is made, so ties go to the order seen, not to the
    lower rank: a segfaulted rank 1 was once reported as rank 0's plain "exit code 1"."""

    def last_line(f) -> str:
        msg = f.message.get("message", "") if isinstance(f.message, dict) else str(f.message or "")
        line = (msg.strip().splitlines() or [""])[-1]
        if not line or "To enable traceback" in line:  # no Python error recorded: it died
            line = f"exit code {f.exitcode}" + (f" ({f.signal_name()})" if f.exitcode < 0 else "")
        return line

    seen = {rank: i for i, rank in enumerate(failures)}

    def key(item):
        rank, f = item
        return (any(s in last_line(f) for s in SECONDARY_ERRORS), f.timestamp, seen[rank])

    rank, f = min(failures.items(), key=key)
    return rank, last_line(f), (f.exitcode if f.exitcode > 0 or f.exitcode == -9 else 1)


def die_with_parent() -> None:
    """A rank exits when its launcher does, even one killed by SIGKILL (the elastic agent starts ranks in
    sessions of their own, outside the process group a harness kills): Linux's PR_SET_PDEATHSIG."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
