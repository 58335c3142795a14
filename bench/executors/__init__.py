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

The package, in the order a config meets it: ``pool`` (the sweep's ``Pool``: slots, and which executor starts
a config), ``local``, ``submitit`` and ``slurm`` (the executors; SLURM's queue and resources), ``common`` (what
they share: ``Outcome``, ``Slot``, a config's file, argv and environment, exit code to status), ``job`` (the
wrapper a submitit job runs: no torch) and ``forkserver`` (what the local launcher imports once).
"""
from bench.executors.common import (  # noqa: F401 (the package's API)
    EXECUTORS,
    ExecutorError,
    Outcome,
    Slot,
    Slots,
    config_argv,
    config_env,
    resolve_jobs,
    write_config,
)
from bench.executors.local import SWEEP_PID_ENV, remove_dead_forkserver_dirs, signals_held  # noqa: F401
from bench.executors.pool import Pool  # noqa: F401
from bench.executors.slurm import MAX_REQUEUES, PENDING_TIMEOUT_S, slurm_parameters  # noqa: F401
