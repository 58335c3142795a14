"""The sweep's launchers and executors: a config forked from the pre-imported launcher is as isolated as one
exec'd (segfault, hang, allocation until killed), --jobs keeps the plan's rows, submitit's local executor runs
the same path as SLURM would, and a SIGKILLed sweep resumes without losing or duplicating a row."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from bench.executors import ExecutorError, Slot, Slots, config_env, resolve_jobs, slurm_parameters
from bench.results import RESULT_COLUMNS
from conftest import ROOT, bench_here, processes_with
from llmopt.core.config import TrainConfig

pytestmark = pytest.mark.multiprocess

# Five configs told apart by seed: seeds 1-3 carry a fault (LLMOPT_FAIL_AT's fourth field), 0 and 4 are healthy.
# The hanging one has two ranks and only rank 1 hangs (rank 0 then waits in its all-reduce): a timeout must take
# both; its single-process baseline (added by the plan, seed 2, one rank) is healthy.
FAULTS = "0:1:segv:1,1:1:hang:2,0:1:alloc:3"
MATRIX = ("[base]\nsteps = 3\nseq_len = 16\nglobal_batch = 4\n" + "".join(
    f"[[config]]\nseed = {s}\n" + ("dp = 2\n" if s == 2 else "") for s in range(5)))
HEALTHY = "[base]\nsteps = 3\nseq_len = 16\nglobal_batch = 4\n[matrix]\nseed = [0, 2, 4]\n"


def bench(*args, env=None, timeout=600, report=False):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "bench.run", *([] if report else ["--no-report"]), *args], cwd=ROOT,
                          env=e, capture_output=True, text=True, timeout=timeout)


def rows(out) -> list[dict]:
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


def losses(out) -> dict[str, list[float]]:
    with open(os.path.join(out, "steps.csv")) as f:
        by: dict[str, list[float]] = {}
        for s in csv.DictReader(f):
            by.setdefault(s["config_id"], []).append(float(s["loss"]))
        return by


def test_faulty_configs_touch_no_healthy_one(tmp_path, capsys, request):
    """A segfault, a hang past --timeout and an allocation until SIGKILL, between two healthy configs: the
    healthy rows are those of a sweep without the faulty ones, each fault has its status, nothing is left. And
    the sweep still gets its report: rows without metrics once crashed it (no report.md, no counts line, exit
    1 even for oom); the resume and bench.report render it the same way."""
    from bench.report import main as report_main
    from bench.run import main as run_main

    (tmp_path / "all.toml").write_text(MATRIX)
    (tmp_path / "healthy.toml").write_text(HEALTHY)
    token = uuid.uuid4().hex
    # the sweep without the faulty configs runs beside it (one thread each: the same arithmetic), mostly while
    # the hang leaves a core idle
    log = open(tmp_path / "healthy.log", "w")
    healthy = ["--no-report", "--matrix", str(tmp_path / "healthy.toml"), "--out", str(tmp_path / "healthy")]
    clean = subprocess.Popen([sys.executable, "-m", "bench.run", *healthy], cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=log)
    request.addfinalizer(lambda: (clean.kill(), clean.wait(), log.close()))  # should an assertion fail first
    # 12 s: the hang waits it out; a config beside the other sweep must not reach it
    r = bench("--matrix", str(tmp_path / "all.toml"), "--out", str(tmp_path / "all"), "--timeout", "12",
              env={"LLMOPT_FAIL_AT": FAULTS, "LLMOPT_TEST_TOKEN": token}, report=True)
    assert r.returncode == 1, r.stderr[-2000:]  # failed and timeout rows: the sweep says so (README's rule)
    assert r.stdout.strip().splitlines()[-1] == "bench: ok 3, failed 1, timeout 1, oom 1", r.stdout[-800:]
    assert processes_with(token) == []
    report = (tmp_path / "all" / "report.md").read_text()
    not_ok = report.split("## Not ok", 1)[1]
    assert [s in not_ok for s in ("| failed |", "| oom |", "| timeout |")] == [True] * 3
    assert "## Time to quality" not in report  # no run here had a target
    os.remove(tmp_path / "all" / "report.md")
    assert run_main(["--resume", "--out", str(tmp_path / "all")]) == 1  # in this process: nothing left to run
    assert (tmp_path / "all" / "report.md").read_text() == report
    assert report_main([str(tmp_path / "all")]) == 0 and (tmp_path / "all" / "report.md").read_text() == report
    capsys.readouterr()
    assert clean.wait(timeout=600) == 0, (tmp_path / "healthy.log").read_text()[-2000:]
    got = {(row["seed"], row["world_size"]): row for row in rows(tmp_path / "all")}
    plan = json.loads((tmp_path / "all" / "plan.json").read_text())["plan"]
    assert [row["config_id"] for row in rows(tmp_path / "all")] == [e["config_id"] for e in plan]  # order kept
    assert len(got) == 6 and ("2", "2") in got  # five configs and the two-rank one's baseline
    assert got["1", "1"]["status"] == "failed" and got["1", "1"]["error"] == "killed by SIGSEGV", got["1", "1"]
    assert got["2", "2"]["status"] == "timeout" and "--timeout" in got["2", "2"]["error"]
    assert got["3", "1"]["status"] == "oom" and "SIGKILL" in got["3", "1"]["error"]
    ref, seen = losses(tmp_path / "healthy"), losses(tmp_path / "all")
    for row in rows(tmp_path / "healthy"):
        assert got[row["seed"], "1"]["status"] == row["status"] == "ok"
        assert seen[row["config_id"]] == ref[row["config_id"]]  # bit for bit: same process path, same seed


def test_jobs_two_gives_the_rows_of_jobs_one(tmp_path):
    m = tmp_path / "m.toml"
    m.write_text("[base]\nsteps = 3\nseq_len = 16\nglobal_batch = 4\n[matrix]\noptimizer = ['adamw']\n"
                 "dp = [1, 2]\n")
    one = bench_here("--matrix", m, "--out", tmp_path / "one", "--no-report")
    two = bench_here("--matrix", m, "--out", tmp_path / "two", "--no-report", "--jobs", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["config_id"] for r in a] == [r["config_id"] for r in b]  # same rows, same order
    assert [r["status"] for r in a] == [r["status"] for r in b] == ["ok"] * len(a)
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    for cid, curve in la.items():  # fewer threads per config: reductions may round differently, nothing more
        assert lb[cid] == pytest.approx(curve, abs=1e-5)
    env = json.loads((tmp_path / "two" / "env.json").read_text())
    assert env["jobs"] == 2 and env["concurrent_cpu"] is True
    assert all("cores (--jobs)" in r["peak_flops_source"] for r in b)  # MFU against the config's share
    from bench.report import write_report

    assert "Figures taken concurrently" in open(write_report(str(tmp_path / "two"))).read()


def test_submitit_local_runs_configs_and_times_one_out_leaving_nothing(tmp_path):
    """The SLURM path through submitit's local executor: a single-process config and a 2-rank data-parallel one
    with the schema's columns and figures (the smoke matrix's layouts, tensor parallel included, run through the
    same SubmititJob on a real SLURM in tests/test_slurm.py), and a config hanging past --timeout: a timeout
    row, and no process left. Two jobs at a time (--jobs 2: a core each), so the others run while it hangs."""
    pytest.importorskip("submitit")
    m = tmp_path / "m.toml"
    m.write_text("[base]\nsteps = 3\nseq_len = 16\nglobal_batch = 4\n[[config]]\nseed = 0\n[[config]]\ndp = 2\n"
                 "[[config]]\nseed = 1\n")
    token = uuid.uuid4().hex
    r = bench("--matrix", str(m), "--out", str(tmp_path / "o"), "--executor", "submitit-local", "--timeout", "8",
              "--jobs", "2", env={"LLMOPT_FAIL_AT": "0:1:hang:1", "LLMOPT_TEST_TOKEN": token})
    assert r.returncode == 1, r.stderr[-3000:]  # the timeout: the sweep says so
    with open(tmp_path / "o" / "results.csv") as f:
        assert next(csv.reader(f)) == RESULT_COLUMNS
    got = {(row["seed"], row["dp"], row["tp"]): row for row in rows(tmp_path / "o")}
    hung = got[("1", "1", "1")]
    assert len(got) == 3 and hung["status"] == "timeout" and "--timeout" in hung["error"]
    ok = [row for key, row in got.items() if key != ("1", "1", "1")]
    assert {row["status"] for row in ok} == {"ok"}
    assert all(float(row["tokens_per_s"]) > 0 and 0 < float(row["mfu"]) <= 1 for row in ok)
    assert {row["parity_verdict"] for row in ok} <= {"baseline", "exact"}
    for row in got.values():  # the job id is in the config's log, and the job's own files under the sweep
        assert "# submitit job " in (tmp_path / "o" / "logs" / f"{row['config_id']}.log").read_text()
    assert (tmp_path / "o" / "submitit").is_dir()
    assert processes_with(token) == []


@pytest.mark.parametrize("executor", ["local", "submitit-local"])
def test_resume_after_sigkill_under_each_executor(tmp_path, executor):
    """SIGKILL of the sweep alone while its second config hangs: that config's processes must still go (the
    forkserver, the config and its ranks die with the sweep; a submitit job watches the sweep), and --resume
    then finishes the plan with every row once."""
    if executor != "local":
        pytest.importorskip("submitit")
    m = tmp_path / "m.toml"
    m.write_text("[base]\nsteps = 3\nseq_len = 16\nglobal_batch = 4\n[matrix]\nseed = [0, 1, 2]\n")
    out, token = tmp_path / "o", uuid.uuid4().hex
    e = dict(os.environ, OMP_NUM_THREADS="1", LLMOPT_TEST_TOKEN=token, LLMOPT_FAIL_AT="0:1:hang:1")
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", "--matrix", str(m), "--out", str(out), "--no-report",
                             "--executor", executor], cwd=ROOT, env=e, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    results, deadline = out / "results.csv", time.time() + 180
    while time.time() < deadline and len(rows(out) if results.exists() else []) < 1:
        time.sleep(0.1)
    time.sleep(2)  # the seed-1 config is hanging now
    proc.send_signal(signal.SIGKILL)  # the sweep alone: its configs must notice and go
    proc.wait()
    before = rows(out)
    assert len(before) == 1
    deadline = time.time() + 30
    while processes_with(token) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_with(token) == []  # nothing left running from the killed sweep
    r = bench_here("--resume", "--out", out, "--executor", executor, "--no-report")
    assert r.returncode == 0, r.stderr[-2000:]
    after = rows(out)
    assert len(after) == 3 and len({row["config_id"] for row in after}) == 3
    assert {row["status"] for row in after} == {"ok"}
    from bench.results import FILLED_AT_END  # the update's prediction is filled in once the sweep finishes

    assert [{k: v for k, v in r.items() if k not in FILLED_AT_END} for r in after[:1]] == [
        {k: v for k, v in r.items() if k not in FILLED_AT_END} for r in before]
    assert sorted(len(c) for c in losses(out).values()) == [3] * 3  # no steps duplicated either


def test_slots_pack_gpus_and_split_cores():
    gpus = Slots("cuda", jobs=8, n_gpus=4)
    a, b = gpus.take(2, running=0), gpus.take(2, running=1)
    assert a.gpus == (0, 1) and b.gpus == (2, 3) and gpus.take(1, running=2) is None
    gpus.give(a)
    assert gpus.take(1, running=1).gpus == (0,)
    assert gpus.too_big(8) == "needs 8 GPUs, this machine has 4" and gpus.too_big(4) is None
    env = config_env(TrainConfig(dp=2, tp=1), Slot(gpus=(2, 3)))
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        cpu = Slots("cpu", jobs=2)
        x, y = cpu.take(1, 0), cpu.take(4, 1)
        assert set(x.cpus).isdisjoint(y.cpus) and cpu.take(1, 2) is None
        assert config_env(TrainConfig(dp=1, tp=1), x)["OMP_NUM_THREADS"] == str(len(x.cpus))
        # the whole machine only once nothing runs, and nothing beside it until it is given back
        assert cpu.take_whole(running=2) is None
        cpu.give(x)
        assert cpu.take_whole(running=1) is None
        cpu.give(y)
        whole = cpu.take_whole(running=0)
        assert whole.cpus is None and cpu.take(1, 1) is None and cpu.take_whole(1) is None
        cpu.give(whole)
        assert {cpu.take(1, 0).cpus, cpu.take(1, 1).cpus} == {x.cpus, y.cpus}
    with pytest.raises(ValueError, match="pinned"):
        Slots("cpu", jobs=1).take_whole(0)
    with pytest.raises(ExecutorError, match="--jobs"):
        Slots("cpu", jobs=len(cores) + 1)
    assert resolve_jobs("auto", "local", "cpu") == (1, 0)  # one at a time on CPU unless asked
    with pytest.raises(ExecutorError, match="--jobs"):
        resolve_jobs("zero", "local", "cpu")


def test_slurm_parameters_follow_the_world_size():
    cfg = TrainConfig(dp=4, tp=4)
    settings = {"gpus_per_node": 8, "cpus_per_node": 64, "partition": "gpu", "account": "proj",
                "options": {"constraint": "h100"}}
    p = slurm_parameters(cfg, "cuda", 900, settings)
    assert p == {"timeout_min": 17, "tasks_per_node": 1, "slurm_signal_delay_s": 60, "nodes": 2, "gpus_per_node": 8,
                 "cpus_per_task": 64, "slurm_exclusive": True, "slurm_partition": "gpu", "slurm_account": "proj",
                 "slurm_additional_parameters": {"constraint": "h100", "requeue": True}}
    # submitit's SIGUSR2 comes after llmopt's own timeout, and the limit after that
    assert 60 * p["timeout_min"] - p["slurm_signal_delay_s"] > 900
    assert slurm_parameters(TrainConfig(dp=2, tp=1), "cuda", 60, {})["gpus_per_node"] == 2
    assert "slurm_exclusive" not in slurm_parameters(TrainConfig(dp=1, tp=1), "cpu", 60, {"share": True})
    with pytest.raises(ExecutorError, match="--gpus-per-node"):
        slurm_parameters(TrainConfig(dp=12, tp=1), "cuda", 60, {"gpus_per_node": 8})
    # a CPU config spans nodes of --ranks-per-node ranks; a one-minute --slurm-time-limit signals 20 s before it
    p = slurm_parameters(TrainConfig(dp=2, tp=2), "cpu", 900, {"ranks_per_node": 2, "time_limit": 1})
    assert (p["nodes"], p["timeout_min"], p["slurm_signal_delay_s"]) == (2, 1, 20)
    assert slurm_parameters(TrainConfig(dp=2, tp=2), "cpu", 900, {})["nodes"] == 1
    with pytest.raises(ExecutorError, match="--ranks-per-node"):
        slurm_parameters(TrainConfig(dp=3, tp=1), "cpu", 60, {"ranks_per_node": 2})


def test_slurm_without_a_cluster_is_one_line(tmp_path):
    r = bench_here("--matrix", "smoke", "--out", tmp_path / "o", "--executor", "slurm",
                   env={"PATH": str(tmp_path)})  # a PATH without sbatch (CI installs SLURM's clients)
    assert r.returncode == 2 and r.stderr.startswith("error: --executor slurm: no sbatch"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    for args in (["--jobs", "0"], ["--slurm-option", "novalue", "--executor", "slurm"],
                 ["--slurm-partition", "gpu"], ["--slurm-share"]):
        r = bench_here("--matrix", "smoke", "--out", tmp_path / "p", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, args


def test_a_config_cancelled_right_after_its_fork_is_gone(tmp_path):
    """Cancel as soon as the launcher has forked the config, before it can have made its own process group
    (the race a SIGTERM to the sweep can hit): the config must still go, not run on unowned."""
    from bench.executors import Pool
    from bench.matrix import expand

    (tmp_path / "m.toml").write_text("[base]\nsteps = 100000\nseq_len = 16\nglobal_batch = 4\n[matrix]\nseed = [0]\n")
    for sub in ("logs", "metrics", "configs"):
        os.makedirs(tmp_path / "o" / sub)
    entry = expand(str(tmp_path / "m.toml"), "cpu", 4)[0]
    pool = Pool("local", "1", "cpu", str(tmp_path / "o"), 60.0, 1)
    for _ in range(3):
        job = pool.start(entry, pool.slots.take(1, 0))
        job.cancel()
        assert job.proc.exitcode is not None  # gone, and reaped by its forkserver
        pool.slots.give(job.slot)


def test_sources_changed_under_a_sweep_start_no_further_config(tmp_path, monkeypatch, capsys):
    """An edit to llmopt or bench while a sweep runs once failed 200 configs (each config's process imports part
    of the sources when it starts, the launcher preloaded the rest): after a change no config starts, the
    running one finishes and keeps its row, one error: line (exit 2) names the file and says to resume, and the
    resume finishes the plan."""
    import bench.run as br

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "m.toml").write_text(HEALTHY)
    real, seen = br.code_signature, []

    def edited_after_the_first_config():  # the sweep's own reading, then the check before the first config
        seen.append(1)
        return {"llmopt/step.py": (1, 1 if len(seen) <= 2 else 2)}

    monkeypatch.setattr(br, "code_signature", edited_after_the_first_config)
    out = tmp_path / "out"
    assert br.main(["--matrix", str(tmp_path / "m.toml"), "--out", str(out), "--no-report", "--no-warm-up"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: llmopt/step.py changed under this sweep")
    assert "--resume" in err[0]
    assert [r["status"] for r in rows(out)] == ["ok"]
    monkeypatch.setattr(br, "code_signature", real)
    assert br.main(["--resume", "--out", str(out), "--no-report"]) == 0
    assert [r["status"] for r in rows(out)] == ["ok"] * 3
