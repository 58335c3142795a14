"""SLURM's side of ``--executor slurm``: the queue's states (squeue, scancel, each call bounded in time), the
resources a config asks for, and the jobs file a resumed sweep cancels from."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

from bench.executors.common import ExecutorError
from llmopt.core.config import TrainConfig

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
# squeue and scancel wait on the controller; one that does not answer (busy, restarting, a lost connection)
# must not freeze the sweep, above all its Ctrl-C: each call is bounded, and a late squeue counts as no answer
SLURM_CALL_TIMEOUT_S = 20.0


def slurm_call(argv: list[str]):
    """``argv`` (squeue, scancel) run with its output captured and SLURM_CALL_TIMEOUT_S to answer; None when
    the command did not answer in time."""

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
    exit-code file (``ConfigJob``) is what says how."""

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

    r = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=False)
    return r.stdout.split() or [nodes]




# submitit asks SLURM for SIGUSR2 this long before the job's time limit (its default, 90 s, fired at once under
# a two-minute limit and ended the job as "timed out and not checkpointable"), at most a third of the limit:
# slurmctld checks every 30 s (PERIODIC_TIMEOUT) and sends the signal at the first check within delay + 30 s
# of the limit, so under a one-minute limit a 20 s delay lands 10-40 s after the start, never before the job's
# wrapper can catch it. The config then has the delay less STOP_MARGIN_S to write its checkpoint. Without
# --slurm-time-limit the limit leaves room after llmopt's own --timeout, which is what decides, counted from
# the job's start like SLURM's limit.
SLURM_SIGNAL_DELAY_S = 60
SLURM_LIMIT_MARGIN_MIN = 2
STOP_MARGIN_S = 10
MAX_REQUEUES = 5  # --max-requeues' default (SLURM's own MaxBatchRequeue default)


def signal_delay_s(time_limit_min: int) -> int:
    return min(SLURM_SIGNAL_DELAY_S, 20 * time_limit_min)


def slurm_parameters(cfg: TrainConfig, device: str, timeout: float, settings: dict) -> dict:
    """submitit parameters for one config: nodes from its world size (GPUs per node, or ``ranks_per_node`` on
    CPU), one task per node (llmopt's launcher, or torch's elastic agent across nodes, starts the ranks), a time
    limit (``time_limit`` minutes, else above the harness's own timeout) with SIGUSR2 before it and the job
    requeueable (it resumes from its checkpoint), its nodes to itself unless ``settings["share"]`` (timings
    taken beside another job are not the config's). ``settings``: the sweep's SLURM settings (``bench.run``:
    flags over the matrix's [slurm] table)."""
    world = cfg.world_size
    limit = settings.get("time_limit") or int(math.ceil(timeout / 60)) + SLURM_LIMIT_MARGIN_MIN
    params = {"timeout_min": limit, "tasks_per_node": 1, "slurm_signal_delay_s": signal_delay_s(limit)}
    if device == "cuda":
        gpus_per_node = settings.get("gpus_per_node") or 8
        per_node = min(world, gpus_per_node)
        if world % per_node:
            raise ExecutorError(f"config of {world} ranks does not fill nodes of {gpus_per_node} GPUs; "
                                f"use --gpus-per-node that divides it")
        params.update(nodes=world // per_node, gpus_per_node=per_node)
    else:
        per_node = min(world, settings.get("ranks_per_node") or world)
        if world % per_node:
            raise ExecutorError(f"config of {world} ranks does not fill nodes of {per_node} ranks; use "
                                f"--ranks-per-node that divides it")
        params.update(nodes=world // per_node)
    if settings.get("cpus_per_node"):
        params["cpus_per_task"] = settings["cpus_per_node"]
    if not settings.get("share"):
        params["slurm_exclusive"] = True
    for key in ("partition", "account"):
        if settings.get(key):
            params[f"slurm_{key}"] = settings[key]
    # requeueable whatever the cluster's JobRequeue default: a requeued config resumes from its checkpoint
    params["slurm_additional_parameters"] = {**dict(settings.get("options") or {}), "requeue": True}
    return params




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
