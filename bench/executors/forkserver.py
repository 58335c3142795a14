"""The first import of the sweep's launcher (bench.executors.start_forkserver has the multiprocessing forkserver
preload it): the modules a config's ranks need, and death with the sweep.

Every process the forkserver forks holds a copy of the fd the forkserver watches for its client's exit, so a
forkserver outlives a SIGKILLed sweep for as long as any config runs, and that config (whose parent is the
forkserver) would run on. Here the forkserver asks Linux to SIGKILL it when the sweep dies
(PR_SET_PDEATHSIG); each config asks the same of the forkserver, and each rank of its config: one chain.
"""
import os

from bench.executors import SWEEP_PID_ENV
from llmopt.launch import die_with_parent, preload

_sweep = os.environ.get(SWEEP_PID_ENV)
if _sweep and _sweep == str(os.getppid()):  # only in the forkserver the sweep itself started
    die_with_parent()
    if os.getppid() != int(_sweep):  # the sweep died before the request was made
        os._exit(1)
preload()
