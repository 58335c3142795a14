"""The sweep's executor and device slots (``Pool``): one place that starts a config on whichever executor."""
from __future__ import annotations

import json
import os

from bench.executors.common import ExecutorError, Outcome, Slot, Slots, resolve_jobs
from bench.executors.local import LocalJob, start_forkserver
from bench.executors.slurm import (
    MAX_REQUEUES,
    PENDING_TIMEOUT_S,
    STOP_MARGIN_S,
    SlurmQueue,
    cancel_leftovers,
    slurm_parameters,
)
from bench.executors.submitit import RefusedJob, SubmititJob, make_submitit_executor, sbatch_message
from bench.plan import PlanEntry
from llmopt.safe_files import open_file


class Pool:
    """The sweep's executor and device slots: ``start(entry, slot)`` gives a polled job handle."""

    def __init__(self, executor: str, jobs: str, device: str, out_dir: str, timeout: float, warmup: int,
                 slurm: dict | None = None, pending_timeout: float = PENDING_TIMEOUT_S,
                 checkpoint_every: int | None = None, log_dir: str | None = None):
        """``checkpoint_every``: configs checkpoint into ``out_dir/checkpoints/<id>`` every N steps (0: only when
        stopped by a signal; None: not at all). SLURM configs always checkpoint (a requeue resumes them).
        ``log_dir``: each config's TensorBoard events in ``log_dir/<id>``."""
        self.executor, self.device, self.out_dir, self.timeout, self.warmup = executor, device, out_dir, timeout, warmup
        self.pending_timeout = pending_timeout
        if executor == "slurm" and checkpoint_every is None:
            checkpoint_every = 0
        self.run_flags = {"checkpoint_every": checkpoint_every, "log_dir": log_dir}
        self.checkpoints = checkpoint_every is not None  # OUT/checkpoints/<id> per config
        self.jobs, n_gpus = resolve_jobs(jobs, executor, device)
        self.slurm = slurm or {}
        self.max_requeues = self.slurm.get("max_requeues", MAX_REQUEUES)
        if executor == "slurm":  # the cluster places jobs; here only a bound on how many are in flight
            self.slots = Slots("cpu", self.jobs, pin=False)
        else:
            self.slots = Slots(device, self.jobs, n_gpus)
        self.local = executor != "slurm"  # the configs run on this machine (peaks can be measured here)
        # CPU configs sharing the machine: the report says so, and MFU is against each one's share of the cores
        self.concurrent_cpu = device == "cpu" and self.local and self.jobs > 1
        self._forkserver = self._submitit = None
        if executor != "local" and ("%" in out_dir or not out_dir.isprintable()):
            # submitit and sbatch read % in a job's file paths as a pattern (%j: the job id), and a control
            # character would split a line of the job's script: refused, not rewritten
            raise ExecutorError(f"--out {out_dir!r}: --executor {executor} cannot use a directory whose path holds "
                                f"'%' or control characters; choose another --out")
        if executor != "local":  # a missing submitit or sbatch is said now, before the sweep writes anything
            self._submitit = make_submitit_executor(executor, os.path.join(out_dir, "submitit"), self.max_requeues)
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
        if self.executor == "local" and self._forkserver is None:
            self._forkserver = start_forkserver()

    def start(self, entry: PlanEntry, slot: Slot):
        args = (entry, self.out_dir, self.timeout, self.warmup, slot)
        if self.executor == "local":
            self.ready()
            return LocalJob(self._forkserver, *args, **self.run_flags)
        params = slurm_parameters(entry.config, self.device, self.timeout, self.slurm)
        if self.executor == "submitit-local":
            params = {"timeout_min": params["timeout_min"]}
            if slot.gpus:
                params.update(gpus_per_node=len(slot.gpus), visible_gpus=list(slot.gpus))
        self._submitit.update_parameters(**params)
        from submitit.core.utils import FailedJobError

        ranks_per_node = entry.config.world_size // params.get("nodes", 1)
        folder = os.path.join(self.out_dir, "submitit")
        before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        try:
            stop_wait = max(5, params["slurm_signal_delay_s"] - STOP_MARGIN_S) if self.executor == "slurm" else 30
            job = SubmititJob(self._submitit, self.queue, os.getpid() if self.executor == "submitit-local" else None,
                              ranks_per_node, self.pending_timeout, stop_wait, self.max_requeues, *args,
                              **self.run_flags)
        except FailedJobError as e:  # sbatch refused it: this config's row fails, not the sweep
            for name in set(os.listdir(folder)) - before:  # the submission script and pickle it left
                os.remove(os.path.join(folder, name))
            why = f"sbatch refused the job: {sbatch_message(e)}"
            with open_file(os.path.join(self.out_dir, "logs", f"{entry.config_id}.log"), "a") as log:
                log.write(f"# {why}\n")
            return RefusedJob(Outcome("failed", why, None, 0.0), slot)
        with open_file(self.jobs_file, "a") as f:  # what a resume after a SIGKILLed sweep must cancel
            f.write(json.dumps({"config_id": entry.config_id, "job_id": str(job.job.job_id)}) + "\n")
        return job


