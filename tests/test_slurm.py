"""Sweeps through ``--executor slurm`` on a real one-node SLURM cluster (``slurm_cluster``): the smoke matrix
through scripts/slurm_sweep.sh as written, llmopt's own --timeout deciding a hang, a segfault's reason, a
SIGKILLed sweep's leftover job cancelled by --resume, and Ctrl-C leaving no job in squeue. The cluster has no
accounting, so every job state here comes from squeue and the jobs' own files."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from bench.results import RESULT_COLUMNS
from conftest import ROOT, processes_with
from slurm_cluster import PARTITION, start_or_skip

pytestmark = pytest.mark.multiprocess

TINY = "[base]\nsteps = 3\nseq_len = 16\nglobal_batch = 4\n"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = start_or_skip(str(tmp_path_factory.mktemp("slurm")))
    yield cluster
    cluster.stop()


# ``python -m bench.run`` as started from a terminal, Ctrl-C raising KeyboardInterrupt, and printing every
# thread's stack on SIGUSR1 (what ``finish`` reports of a sweep that did not end). From a terminal: pytest run
# in the background by a script (``cmd &``, as a CI runner may) has SIGINT ignored (POSIX), Python leaves an
# ignored SIGINT ignored, and the sweep inherited it, so the Ctrl-C test waited out its timeout there.
DUMPABLE_BENCH_RUN = ("import faulthandler, runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "faulthandler.register(signal.SIGUSR1, all_threads=True); "
                      "runpy.run_module('bench.run', run_name='__main__', alter_sys=True)")


def sweep(cluster, *args, env=None, **kw):
    e = dict(cluster.env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-c", DUMPABLE_BENCH_RUN, *map(str, args)], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=300, cluster=None) -> tuple[int, str, str]:
    """The sweep's exit code and output; one that has not ended within ``timeout`` fails the test with what
    it was doing: its signal masks, its threads' stacks, and the jobs squeue still shows."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with open(f"/proc/{proc.pid}/status") as f:
            masks = "".join(line for line in f if line.startswith(("State", "Sig", "Shd")))
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        proc.kill()
        out, err = proc.communicate()
        queued = cluster.squeue() if cluster is not None else "?"
        pytest.fail(f"the sweep did not end within {timeout} s; squeue: {queued}\n{masks}stdout: {out[-1500:]}\n"
                    f"stderr: {err[-5000:]}")
    return proc.returncode, out, err


def rows(out) -> list[dict]:
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


def wait_for(what, ready, timeout=90.0):
    end = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < end, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)


def running_job(out) -> str:
    """The id of the sweep's job that has started (its start file is there), or ""."""
    metrics = os.path.join(out, "metrics")
    started = [f for f in os.listdir(metrics) if f.endswith(".started")] if os.path.isdir(metrics) else []
    if not started:
        return ""
    with open(os.path.join(out, "submitit", "jobs.jsonl")) as f:
        ids = {j["config_id"]: j["job_id"] for j in map(json.loads, f)}
    return ids.get(started[0].split(".json")[0], "")


def test_slurm_sweep_script_runs_the_smoke_matrix(slurm, tmp_path):
    """scripts/slurm_sweep.sh as written (partition, matrix and device from the environment): every smoke row
    ok with the local schema, MFU against a peak measured on the node, each job alone on its node, and not
    one sacct warning in the progress output."""
    out = tmp_path / "o"
    env = dict(slurm.env, MATRIX="smoke", DEVICE="cpu", PARTITION=PARTITION, TIMEOUT="120", OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "scripts/slurm_sweep.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "sacct" not in r.stdout + r.stderr and "UNKNOWN" not in r.stdout
    with open(out / "results.csv") as f:
        assert next(csv.reader(f)) == RESULT_COLUMNS
    got = rows(out)
    assert len(got) == 5 and {row["status"] for row in got} == {"ok"}
    assert {row["parity_verdict"] for row in got} <= {"baseline", "exact"}
    for row in got:
        assert float(row["tokens_per_s"]) > 0 and 0 < float(row["mfu"]) <= 1, row
        # all five are queued at once and run one after another: start-up counts from the job's start, not
        # its submission
        assert 0 < float(row["startup_s"]) < float(row["wall_s"]), row
        assert row["peak_flops_source"].endswith(f"on node {slurm.node}"), row["peak_flops_source"]
        log = (out / "logs" / f"{row['config_id']}.log").read_text()
        assert "# submitit job " in log and f"running on {slurm.node}, OMP_NUM_THREADS=" in log
    assert os.path.exists(out / "peak_flops" / f"{slurm.node}.json")
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["slurm_shared_nodes"] is False and env_json["slurm_most_per_node"] == 1  # --exclusive
    assert "each with its node(s) to itself" in (out / "report.md").read_text()
    assert slurm.squeue() == []


def test_slurm_timeout_and_segfault_rows_on_shared_nodes(slurm, tmp_path):
    """A config hanging past --timeout is a timeout row decided by llmopt's own clock (not a scheduler state
    read as UNKNOWN), a segfaulting one a failed row saying so, the healthy one ok; nothing is left running.
    With --slurm-share and one CPU per job, two jobs run at once on the 2-CPU node, and the report says so."""
    m = tmp_path / "m.toml"
    m.write_text(TINY + "[matrix]\nseed = [0, 1, 2]\n")
    token = uuid.uuid4().hex
    p = sweep(slurm, "--matrix", m, "--out", tmp_path / "o", "--executor", "slurm", "--timeout", "10",
              "--slurm-share", "--cpus-per-node", "1",
              env={"LLMOPT_FAIL_AT": "0:1:segv:1,0:1:hang:2", "LLMOPT_TEST_TOKEN": token})
    rc, out, err = finish(p, cluster=slurm)
    assert rc == 1, out[-2000:] + err[-3000:]
    assert "sacct" not in out + err
    got = {row["seed"]: row for row in rows(tmp_path / "o")}
    assert got["0"]["status"] == "ok"
    assert got["1"]["status"] == "failed" and got["1"]["error"] == "killed by SIGSEGV", got["1"]
    assert got["2"]["status"] == "timeout" and "--timeout" in got["2"]["error"], got["2"]
    assert 10 <= float(got["2"]["wall_s"]) < 25  # counted from the job's start, not its submission
    most = json.loads((tmp_path / "o" / "env.json").read_text())["slurm_most_per_node"]
    assert most == min(2, slurm.cpus)
    assert f"up to {most} configs were seen running at once on one node" in (tmp_path / "o" / "report.md").read_text()
    wait_for("job left running", lambda: slurm.squeue() == [] and processes_with(token) == [], 30)


def test_slurm_sigkill_then_resume_cancels_the_leftover_job(slurm, tmp_path):
    """SIGKILL of the sweep while a job runs leaves that job on the cluster; --resume cancels it before it
    submits the config again, and finishes with one row per config."""
    m = tmp_path / "m.toml"
    m.write_text(TINY + "[matrix]\nseed = [0, 1]\n")
    out = tmp_path / "o{x}"  # braces: a SLURM job once formatted the sweep's path and failed its ok row
    token = uuid.uuid4().hex
    p = sweep(slurm, "--matrix", m, "--out", out, "--executor", "slurm", "--timeout", "300", "--no-report",
              env={"LLMOPT_FAIL_AT": "0:1:hang:1", "LLMOPT_TEST_TOKEN": token})
    wait_for("seed 1's job running", lambda: os.path.exists(out / "results.csv") and len(rows(out)) == 1
             and running_job(out) != "")
    leftover = running_job(out)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert leftover in slurm.squeue()  # nobody cancelled it: the sweep was killed
    r = sweep(slurm, "--resume", "--out", out, "--executor", "slurm", "--timeout", "300")
    rc, stdout, err = finish(r, cluster=slurm)
    assert rc == 0, stdout[-2000:] + err[-3000:]
    assert "scancel sent for the 2 job(s)" in stdout
    got = rows(out)
    assert sorted(row["seed"] for row in got) == ["0", "1"] and {row["status"] for row in got} == {"ok"}
    wait_for("the leftover job's processes gone", lambda: processes_with(token) == [] and slurm.squeue() == [], 30)


def test_slurm_jobs_that_cannot_start_fail_their_rows_with_the_reason(slurm, tmp_path):
    """A job that can never start (more CPUs than the node has) once sat silent for minutes: its pending reason
    is on the progress output and its row fails at once with it. One pending for a reason that may clear fails
    after --pending-timeout. An sbatch refusal (an unknown partition, an unsatisfiable constraint) is a failed
    row with sbatch's words: no traceback, no submission files left behind. Nothing stays in squeue."""
    m = tmp_path / "m.toml"
    m.write_text(TINY + "[matrix]\nseed = [0]\n")
    p = sweep(slurm, "--matrix", m, "--out", tmp_path / "never", "--executor", "slurm", "--no-report",
              "--cpus-per-node", "64")
    rc, out, err = finish(p, timeout=60, cluster=slurm)
    assert rc == 1 and "pending: PartitionConfig" in out and "Traceback" not in err, out[-2000:] + err[-2000:]
    (row,) = rows(tmp_path / "never")
    assert row["status"] == "failed" and "can never start: SLURM says PartitionConfig" in row["error"], row
    assert slurm.squeue() == []
    blocker = subprocess.run(["sbatch", "--exclusive", "--wrap", "sleep 120", "--output", "/dev/null"],
                             env=slurm.env, capture_output=True, text=True, check=True).stdout.split()[-1]
    try:
        p = sweep(slurm, "--matrix", m, "--out", tmp_path / "busy", "--executor", "slurm", "--no-report",
                  "--pending-timeout", "3")
        rc, out, err = finish(p, timeout=60, cluster=slurm)
    finally:
        subprocess.run(["scancel", blocker], env=slurm.env, check=False)
    (row,) = rows(tmp_path / "busy")
    assert row["status"] == "failed" and "still pending after" in row["error"] and "--pending-timeout" in row["error"]
    p = sweep(slurm, "--matrix", m, "--out", tmp_path / "refused", "--executor", "slurm", "--no-report",
              "--slurm-partition", "nope")
    rc, out, err = finish(p, timeout=60, cluster=slurm)
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    (row,) = rows(tmp_path / "refused")
    assert row["status"] == "failed" and row["error"].startswith("sbatch refused the job: invalid partition"), row
    assert os.listdir(tmp_path / "refused" / "submitit") == []  # no stray submission script or pickle
    p = sweep(slurm, "--matrix", m, "--out", tmp_path / "constraint", "--executor", "slurm", "--no-report",
              "--slurm-option", "constraint=no-such-feature")
    rc, out, err = finish(p, timeout=60, cluster=slurm)
    (row,) = rows(tmp_path / "constraint")
    assert rc == 1 and "Traceback" not in err and row["error"].startswith("sbatch refused the job:"), row
    assert "feature" in row["error"].lower() and os.listdir(tmp_path / "constraint" / "submitit") == []
    wait_for("an empty queue", lambda: slurm.squeue() == [], 30)


def test_slurm_ctrl_c_leaves_no_job(slurm, tmp_path):
    m = tmp_path / "m.toml"
    m.write_text(TINY + "[matrix]\nseed = [0]\n")
    out = tmp_path / "o"
    token = uuid.uuid4().hex
    p = sweep(slurm, "--matrix", m, "--out", out, "--executor", "slurm", "--timeout", "300", "--no-report",
              env={"LLMOPT_FAIL_AT": "0:1:hang:0", "LLMOPT_TEST_TOKEN": token})
    wait_for("the job running", lambda: running_job(out) != "")
    p.send_signal(signal.SIGINT)
    rc, stdout, err = finish(p, timeout=120, cluster=slurm)
    assert rc == 128 + signal.SIGINT and "--resume" in err, err[-2000:]
    assert slurm.squeue() == [] and processes_with(token) == []


def fake_slurm_job(tmp_path, queue, timeout: float = 60.0, max_requeues: int = 5, stderr: str = ""):
    """A SubmititJob of one tiny config whose submission and squeue are stand-ins (``queue``: a SlurmQueue)."""
    import bench.executors.submitit as ex
    from bench.executors import Slot
    from bench.matrix import expand

    class FakeJob:
        job_id = "7"

        def stderr(self):
            return stderr

    class FakeExecutor:
        def submit(self, *args):
            return FakeJob()

    (tmp_path / "m.toml").write_text(TINY + "[matrix]\nseed = [0]\n")
    for sub in ("logs", "metrics", "configs"):
        os.makedirs(tmp_path / "o" / sub)
    entry = expand(str(tmp_path / "m.toml"), "cpu", 4)[0]
    return ex.SubmititJob(FakeExecutor(), queue, None, 1, 600.0, 30.0, max_requeues, entry, str(tmp_path / "o"),
                          timeout, 1, Slot())


@pytest.mark.parametrize("state, status, error", [
    ("CANCELLED", "failed", "job 7 ended CANCELLED: KeyboardInterrupt"),
    ("OUT_OF_MEMORY", "oom", "job 7 ended OUT_OF_MEMORY: KeyboardInterrupt"),
    ("TIMEOUT", "timeout", "SLURM TIMEOUT (job 7): the job's time limit was reached"),
    (None, "failed", "job 7 left the queue with no exit code (no accounting to say how): KeyboardInterrupt"),
    ("COMPLETED:rc", "ok", ""),
])
def test_a_job_ended_by_slurm_gets_its_state(tmp_path, monkeypatch, state, status, error):
    """Without a cluster: a job squeue shows ended with no exit-code file (the scheduler ended it before its
    config did) gets SLURM's state and the last line of submitit's log; one whose file is there, its code."""
    import bench.executors.submitit as ex
    from bench.executors.slurm import SlurmQueue

    class FakeQueue(SlurmQueue):
        def state(self, job_id):
            return None if state is None else (state.split(":")[0], "")

    monkeypatch.setattr(ex, "FILE_GRACE_S", 0.0)
    job = fake_slurm_job(tmp_path, FakeQueue(), stderr="Traceback (most recent call last):\n  ...\nKeyboardInterrupt\n")
    if state == "COMPLETED:rc":  # the config's metrics and exit code, as ConfigJob leaves them
        import shutil

        ok = bench_smoke_metrics(tmp_path)
        shutil.copy(ok, job.metrics_path)
        with open(job.rc_path, "w") as f:
            f.write("0\n")
    outcome = job.poll() or (time.sleep(0.01), job.poll())[1]
    assert (outcome.status, outcome.error) == (status, error)
    if status != "ok" and status != "timeout":
        assert open(job.log_path).read().endswith(f"# {error}\n")  # the reason, once, in the config's log
    assert not os.path.exists(job.rc_path)


def bench_smoke_metrics(tmp_path) -> str:
    """A real metrics file: one 3-step config run by llmopt.train."""
    from llmopt.train import main

    path = str(tmp_path / "ok.json")
    assert main(["--steps", "3", "--seq-len", "16", "--global-batch", "4", "--quiet", "--metrics-out", path]) == 0
    return path


def test_a_slurm_command_that_does_not_answer_is_bounded(monkeypatch, capsys):
    """Without a cluster: squeue or scancel that hangs (a busy or unreachable controller) is given up on, said
    once, and the queue keeps what squeue said last instead of freezing the sweep (or its Ctrl-C)."""
    import bench.executors.slurm as ex

    monkeypatch.setattr(ex, "SLURM_CALL_TIMEOUT_S", 0.2)
    assert ex.slurm_call(["sleep", "30"]) is None  # not the command's own exit: it would have taken 30 s
    assert "sleep did not answer within 0 s" in capsys.readouterr().err
    queue = ex.SlurmQueue(interval=0.0)
    queue.ids, queue.asked, queue.states = {"7"}, {"7"}, {"7": ("RUNNING", "")}
    monkeypatch.setattr(ex, "slurm_call", lambda argv: None)
    assert queue.state("7") == ("RUNNING", "")


def job_of(out, config_id: str) -> str:
    with open(os.path.join(out, "submitit", "jobs.jsonl")) as f:
        return [j["job_id"] for j in map(json.loads, f) if j["config_id"] == config_id][-1]


def uninterrupted_losses(out, config_id: str, tmp_path) -> list[str]:
    """The config run again here, in one go, with the OpenMP threads its job had (the log says; another count
    sums in another order), its losses as steps.csv writes them."""
    log = (out / "logs" / f"{config_id}.log").read_text()
    threads = log.split("OMP_NUM_THREADS=")[1].split(",")[0].split()[0]
    m = str(tmp_path / f"{config_id}.json")
    r = subprocess.run([sys.executable, "-m", "llmopt.train", "--config", str(out / "configs" / f"{config_id}.json"),
                        "--quiet", "--metrics-out", m], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=threads),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(m) as f:
        return [f"{x:.8g}" for x in json.load(f)["losses"]]


def test_slurm_preempted_and_time_limited_jobs_resume_from_their_checkpoints(slurm, tmp_path):
    """Requirement: a SLURM job stopped early checkpoints, is requeued, resumes and ends ok with the losses of an
    uninterrupted run. Two configs at once on the node, each waiting mid-run for a stop signal (LLMOPT_FAIL_AT
    wait, after its handler is installed): seed 0 gets SLURM's own SIGUSR2 before a one-minute
    --slurm-time-limit (submitit checkpoints and requeues it), seed 1 an ``scontrol requeue`` (SIGTERM, as a
    preemption). Each row says how many times it was requeued (once, or more where SLURM's time-limit signal,
    which comes 10-40 s into a one-minute job, also caught a resumed run before it ended); an ok row's
    checkpoints are removed."""
    m = tmp_path / "m.toml"
    m.write_text("[base]\nsteps = 8\nseq_len = 16\nglobal_batch = 4\npreset = \"nano\"\n[matrix]\nseed = [0, 1]\n")
    out = tmp_path / "o"
    p = sweep(slurm, "--matrix", m, "--out", out, "--executor", "slurm", "--slurm-share", "--cpus-per-node", "1",
              "--slurm-time-limit", "1", "--timeout", "120",
              env={"LLMOPT_FAIL_AT": "0:3:wait:0,0:3:wait:1"})
    wait_for("both configs waiting", lambda: os.path.isdir(out / "logs") and sum(
        "waiting for a stop signal" in (out / "logs" / n).read_text() for n in os.listdir(out / "logs")) == 2, 60)
    ids = {}
    for name in os.listdir(out / "logs"):
        cfg = json.loads((out / "configs" / name.replace(".log", ".json")).read_text())
        ids[cfg["seed"]] = name[:-len(".log")]
    subprocess.run(["scontrol", "requeue", job_of(out, ids[1])], env=slurm.env, check=True)
    rc, stdout, err = finish(p, timeout=240, cluster=slurm)
    assert rc == 0, stdout[-2000:] + err[-3000:]
    got = {int(row["seed"]): row for row in rows(out)}
    for seed, signal_name in ((0, "SIGUSR2"), (1, "SIGTERM")):
        row, cid = got[seed], ids[seed]
        assert row["status"] == "ok" and int(row["requeues"]) >= 1, row
        log = (out / "logs" / f"{cid}.log").read_text()
        assert f"stopped by {signal_name} after 4 steps, with a checkpoint" in log, log
        assert f"requeued {row['requeues']} time(s)" in log and f"requeued {int(row['requeues']) + 1} time" not in log
        with open(out / "steps.csv") as f:
            losses = [r["loss"] for r in csv.DictReader(f) if r["config_id"] == cid]
        assert losses == uninterrupted_losses(out, cid, tmp_path), seed
    assert os.listdir(out / "checkpoints") == []
    assert "**Requeued**: 2 config(s) were stopped by SLURM" in (out / "report.md").read_text()
    wait_for("an empty queue", lambda: slurm.squeue() == [], 30)


def test_a_requeued_job_restarts_its_clock_and_fails_past_max_requeues(tmp_path, monkeypatch):
    """Without a cluster: each start of a job (its start file, with SLURM's restart count) restarts --timeout's
    clock and sets the row's requeues; waiting in the queue after a requeue is not timed out; a job requeued more
    than --max-requeues times is cancelled and its row fails saying so."""
    import bench.executors.submitit as ex
    from bench.executors.slurm import SlurmQueue

    states = {"now": ("RUNNING", "")}
    cancelled = []

    class FakeQueue(SlurmQueue):
        def state(self, job_id):
            return ("CANCELLED", "") if cancelled else states["now"]

    monkeypatch.setattr(ex, "slurm_call", lambda argv: cancelled.append(argv))
    job = fake_slurm_job(tmp_path, FakeQueue(), timeout=0.3, max_requeues=1)
    clock = [1000.0]
    monkeypatch.setattr(ex.time, "monotonic", lambda: clock[0])

    def started(requeues: int) -> None:
        with open(job.started_path, "w") as f:
            f.write(f"n1 {1e9 + requeues} {requeues}\n")

    started(0)
    assert job.poll() is None and job.requeues == 0
    clock[0] += 0.2
    started(1)  # requeued: a new start, its own --timeout (0.3 s) from here
    clock[0] += 0.2
    assert job.poll() is None and job.requeues == 1
    states["now"] = ("PENDING", "BeginTime")  # requeued again, waiting: the scheduler's time
    clock[0] += 5.0
    assert job.poll() is None
    states["now"] = ("RUNNING", "")
    started(2)
    outcome = job.poll()
    assert outcome.status == "failed" and outcome.requeues == 2, outcome
    assert "requeued 2 times, more than --max-requeues 1" in outcome.error
    assert ["scancel", "7"] in cancelled
