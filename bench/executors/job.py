"""What runs inside a submitit job (``--executor submitit-local`` or ``slurm``) before and after its config:
``run_in_job``. The job unpickles it by reference, so this module imports no torch (nor anything that does):
a config's ``llmopt.train`` imports torch itself, and the job's wrapper doing so too cost each job a second
import before its config could start."""
from __future__ import annotations

import gc
import os
import sys
import time

from llmopt.core.config import TrainConfig
from llmopt.core.run_metrics import read_metrics
from llmopt.launch import LAUNCH_T0_ENV, die_with_parent
from llmopt.safe_files import open_file


def run_in_job(argv: list[str], env: dict, log_path: str, cwd: str, sweep_pid: int | None,
               nproc_per_node: int = 1, cancel_path: str | None = None, config: TrainConfig | None = None,
               peak_cache: str | None = None) -> int:
    """Inside a submitit job: mark the start, run the config with its output into the config's log, write its
    exit code, and return it. It stops when ``cancel_path`` appears (the sweep cancelled it) or, with
    ``sweep_pid`` (submitit-local), when the sweep is gone, as a local config does. With ``peak_cache`` (SLURM:
    a directory holding ``<node>.json`` per node; the sweep's path is never a format string, so braces in
    ``--out`` are plain characters) the peak FLOP/s the row's MFU is stated against is taken here, on the node
    the config ran on, once per node and dtype for the whole sweep."""
    import socket
    import subprocess
    import threading

    import submitit

    job_env = submitit.JobEnvironment()
    metrics_path = argv[argv.index("--metrics-out") + 1]
    first = job_env.global_rank == 0  # across nodes, the first node's task speaks for the job
    t_start = time.time()
    if first:
        with open_file(metrics_path + ".started") as f:
            f.write(f"{socket.gethostname()} {t_start}\n")
    cmd = [sys.executable, "-m", "llmopt.train", *argv]
    if job_env.num_nodes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={job_env.num_nodes}",
               f"--node-rank={job_env.node}", f"--nproc-per-node={nproc_per_node}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={job_env.hostnames[0]}:29500",
               f"--rdzv-id={job_env.job_id}", "-m", "llmopt.train", *argv]
    env = dict(os.environ, **env)
    # start-up counts from the job's start, as --timeout does: time queued is the scheduler's, not the config's
    env[LAUNCH_T0_ENV] = repr(t_start)
    if peak_cache:  # SLURM: this node's cores (the job's allocation) split between its ranks, as locally
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc_per_node))
    with open_file(log_path, "a") as log:
        log.write(f"# job {job_env.job_id} running on {socket.gethostname()}, OMP_NUM_THREADS="
                  f"{env.get('OMP_NUM_THREADS', '(unset)')}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
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
    if first:
        if rc == 0 and peak_cache and config is not None:
            metrics, _ = read_metrics(metrics_path)  # unreadable: the sweep reads it again and says so
            if metrics is not None:
                from bench.hardware import measure_node_peak  # SLURM only; torch only for a measurement

                measure_node_peak(config, metrics, metrics_path,
                                  os.path.join(peak_cache, f"{socket.gethostname()}.json"))
        with open_file(metrics_path + ".rc") as f:  # last: the sweep takes the job as ended once this exists
            f.write(f"{rc}\n")
    gc.freeze()  # the job's process exits next: as llmopt.core.cli.exit, its shutdown skips what the peak imported
    return rc
