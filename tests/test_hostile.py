"""Nothing lost, nothing left behind: the harness and the CLI under faults, races and hostile input. Each
test reproduces a case that once lost data, left a process behind or printed a traceback."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, bench_here, one_error_line

TINY = "[base]\nsteps = 3\nseq_len = 16\nglobal_batch = 4\n"


def bench(*args, cwd=ROOT, timeout=300, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def done_sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("done")
    (d / "m.toml").write_text(TINY + "[matrix]\noptimizer = ['adamw', 'sgd']\n")
    r = bench("--matrix", str(d / "m.toml"), "--out", str(d / "out"), "--no-report")
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "out"


def copy_sweep(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_resume_never_deletes_what_it_cannot_read(done_sweep, tmp_path):
    out = copy_sweep(done_sweep, tmp_path / "out")
    text = (out / "results.csv").read_text()
    header, *rows = text.splitlines(keepends=True)
    (out / "results.csv").write_text(header.replace("error,", "", 1) + "".join(rows))  # a hand edit lost a column
    before = {p: (out / p).read_bytes() for p in ("results.csv", "steps.csv")}
    line = one_error_line(bench("--resume", "--out", str(out), "--no-report"))
    assert "--repair" in line and "field count" in line
    assert {p: (out / p).read_bytes() for p in before} == before  # nothing changed
    r = bench("--resume", "--repair", "--out", str(out), "--no-report")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((out / "results.csv.rejected").read_text().splitlines()) == 2  # the two rows, kept aside


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    """A sweep holds its directory's lock for as long as it runs: a resume started beside it is refused."""
    (tmp_path / "m.toml").write_text("[base]\nsteps = 100000\nseq_len = 16\nglobal_batch = 4\n[matrix]\ndp = [1]\n")
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    first = subprocess.Popen([sys.executable, "-m", "bench.run", "--matrix", str(tmp_path / "m.toml"), "--out",
                              str(tmp_path / "o"), "--no-report"], cwd=ROOT, env=e, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (tmp_path / "o" / "logs").is_dir() and any((tmp_path / "o" / "logs").iterdir()) or None)
        line = one_error_line(bench("--resume", "--out", str(tmp_path / "o"), "--no-report"))
        assert f"PID {first.pid}" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


def test_config_ids_do_not_collide_and_huge_matrices_are_refused(tmp_path):
    from bench.matrix import MatrixError, expand

    (tmp_path / "m.toml").write_text("[matrix]\nseed = " + str(list(range(100))) + "\nlr = "
                                     + str([round(0.001 * (i + 1), 6) for i in range(100)]) + "\n")
    plan = expand(str(tmp_path / "m.toml"), "cpu", 4)
    assert len({e.config_id for e in plan}) == len(plan) == 10_000
    (tmp_path / "big.toml").write_text("[matrix]\n" + "".join(f"{k} = {list(range(1, 1001))}\n"
                                                              for k in ("seed", "steps", "seq_len", "global_batch")))
    with pytest.raises(MatrixError, match="1,000,000,000,000 combinations"):
        expand(str(tmp_path / "big.toml"), "cpu", 4)
    r = bench("--matrix", str(tmp_path / "big.toml"), "--out", str(tmp_path / "o"))
    assert "--max-configs" in one_error_line(r)


def test_divergence_before_the_first_timed_step_is_diverged(tmp_path):
    (tmp_path / "m.toml").write_text("[base]\nsteps = 6\nseq_len = 16\nglobal_batch = 4\noptimizer = 'sgd'\n"
                                     "max_grad_norm = 0.0\n[matrix]\nlr = [1000.0]\n")
    r = bench("--matrix", str(tmp_path / "m.toml"), "--out", str(tmp_path / "o"), "--no-report")
    assert r.returncode == 0, r.stderr  # diverged is a finding, not breakage
    (row,) = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert row["status"] == "diverged" and int(row["diverged_at_step"]) < 2, row


def test_outputs_are_checked_before_training(tmp_path, capsys):
    """In this process: llmopt.train's main, as its command line calls it."""
    from llmopt.train import main

    data = tmp_path / "d.txt"
    data.write_text("some text " * 100)
    os.mkfifo(tmp_path / "fifo")
    cases = [["--data", str(data), "--metrics-out", str(data)], ["--metrics-out", str(tmp_path)],
             ["--metrics-out", "/proc/version"], ["--metrics-out", str(tmp_path / "fifo")]]
    for extra in cases:
        assert main(["--steps", "1", "--seq-len", "16", *extra]) == 2, extra
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith("error:") and "step" not in out, err
    assert data.read_text() == "some text " * 100  # the input was never overwritten


@pytest.mark.parametrize("flags", [
    ["--lr", "nan"], ["--lr", "inf"], ["--weight-decay", "nan"], ["--weight-decay", "inf"], ["--max-grad-norm", "nan"],
    ["--seed", str(2**70)], ["--data", "EMPTY"], ["--data", "SHORT"], ["--data", "FIFO"],
], ids=str)
def test_bad_values_are_one_line(tmp_path, cli, flags):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("abc")
    if "FIFO" in flags:
        os.mkfifo(tmp_path / "fifo")
    subst = {"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt"), "FIFO": str(tmp_path / "fifo")}
    r = cli("-m", "llmopt.train", "--steps", "1", *[subst.get(f, f) for f in flags], timeout=60)
    one_error_line(r)


def test_an_allocation_failure_is_oom(cli):
    r = cli("-m", "llmopt.train", "--steps", "1", "--global-batch", "99999999999", "--seq-len", "16", timeout=120)
    assert r.returncode == 4 and "out of memory" in r.stderr.strip().splitlines()[-1], r.stderr[-1000:]


@pytest.mark.parametrize("text, match", [
    ("base = 5\n[matrix]\ndp = [1]\n", "base must be a table"),
    ("[matrix]\ndp = ['²']\n", "not an integer"),
    # values wrong on their own are the user's mistake (they were skipped rows, or tracebacks)
    ("[base]\nseed = -1\n[matrix]\ndp = [1]\n", "seed = -1: must be between 0 and 2^63 - 1"),
    ("[matrix]\nglobal_batch = [0]\n", "global_batch = 0: must be at least 1"),
    ("[matrix]\nlr = [nan]\n", "lr = nan: must be a finite number"),
    ("[base]\ndata = 'no-such-corpus.txt'\n[matrix]\ndp = [1]\n", "no such file or directory"),
    ("[matrix]\npreset = ['tiny', 'huge']\n", "preset = 'huge': unknown value"),
    ("[matrix]\nlr = [0.001, 0]\n", "lr = 0.0: must be above 0"),
], ids=["base-5", "superscript", "seed", "batch-0", "lr-nan", "missing-data", "unknown-preset", "lr-0"])
def test_hostile_toml_is_one_line(tmp_path, text, match, capsys):
    """In this process (bench.run's main, as the command line calls it): one error line, exit 2, nothing run."""
    from bench.run import main

    (tmp_path / "m.toml").write_text(text)
    assert main(["--matrix", str(tmp_path / "m.toml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "o").exists()


def test_a_bad_combination_of_valid_values_stays_a_skipped_row(tmp_path):
    from bench.matrix import expand

    (tmp_path / "m.toml").write_text("[matrix]\ntp = [1, 3]\n")
    plan = expand(str(tmp_path / "m.toml"), "cpu", 4)
    skipped = [e.skipped for e in plan if e.skipped]
    assert len(plan) == 2 and len(skipped) == 1 and "--tp 3 does not divide" in skipped[0]


def test_hostile_flags_and_files_are_one_line(done_sweep, tmp_path, capsys):
    """In this process: bench.run's main, as its command line calls it."""
    from bench.run import main

    def error_of(*args) -> str:
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse's own checks
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error:"), err
        return err

    (tmp_path / "file").write_text("x")
    error_of("--filter", "dp=²", "--out", str(tmp_path / "a"))
    error_of("--timeout", "nan", "--out", str(tmp_path / "b"))
    assert "is a file" in error_of("--matrix", "smoke", "--out", str(tmp_path / "file"))
    assert "plan.json" in error_of("--resume", "--matrix", "smoke", "--out", str(done_sweep))
    for name, damage in (("plan.json", "{oops"), ("peak_flops.json", "[1, 2")):
        out = copy_sweep(done_sweep, tmp_path / name)
        (out / name).write_text(damage)
        assert name in error_of("--resume", "--out", str(out), "--no-report")


def test_a_huge_csv_field_is_read(done_sweep, tmp_path):
    from bench.report import load

    out = copy_sweep(done_sweep, tmp_path / "out")
    rows = list(csv.DictReader(open(out / "results.csv")))
    rows[0]["error"] = "x" * 300_000
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert len(load(str(out))[0]) == 2
    assert bench("--resume", "--out", str(out), "--no-report").returncode == 0


def test_a_stray_carriage_return_is_an_unreadable_line_not_a_traceback(done_sweep, tmp_path):
    """A \\r inside a row (a hand edit, a Windows tool) once raised csv.Error in --resume, --repair and
    bench.report. Now it is a line of the wrong field count: resume refuses, --repair moves it aside, the report
    leaves it out and says so."""
    from bench.report import write_report

    out = copy_sweep(done_sweep, tmp_path / "out")
    header, first, *rest = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text(header + first.replace(",ok,", ",ok\r,", 1) + "".join(rest))
    assert "--repair" in one_error_line(bench("--resume", "--out", str(out), "--no-report"))
    report = open(write_report(str(out))).read()
    assert "Unreadable lines left out**: 2 in results.csv" in report and "Configs: 1 (" in report
    r = bench("--resume", "--repair", "--out", str(out), "--no-report")
    assert r.returncode == 0 and (out / "results.csv.rejected").exists(), r.stderr[-2000:]
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 2  # the damaged config ran again


def test_relative_paths_are_taken_from_where_the_command_ran(tmp_path):
    (tmp_path / "corpus.txt").write_text("hello relative world. " * 200)
    (tmp_path / "m.toml").write_text(TINY + "data = 'corpus.txt'\n[matrix]\noptimizer = ['adamw']\n")
    r = bench_here("--matrix", "m.toml", "--out", "rel-out", "--no-report", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = list(csv.DictReader(open(tmp_path / "rel-out" / "results.csv")))
    assert row["status"] == "ok" and row["data"] == str(tmp_path / "corpus.txt")


def test_exit_status_is_1_when_a_config_failed_and_the_error_is_not_the_command(tmp_path):
    (tmp_path / "m.toml").write_text(TINY + "[matrix]\noptimizer = ['adamw']\n")
    r = bench_here("--matrix", tmp_path / "m.toml", "--out", tmp_path / "o", "--no-report",
                   env={"LLMOPT_FAIL_AT": "0:1:exit"})
    assert r.returncode == 1 and r.stdout.strip().splitlines()[-1] == "bench: failed 1", r.stdout[-500:]
    (row,) = list(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert row["status"] == "failed" and not row["error"].startswith("$") and "llmopt.train" not in row["error"]


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    children: dict[int, list[int]] = {}
    for line in out:
        if line.strip():
            p, pp = map(int, line.split())
            children.setdefault(pp, []).append(p)
    todo, seen = [pid], set()
    while todo:
        for c in children.get(todo.pop(), []):
            seen.add(c)
            todo.append(c)
    return seen


def _alive(pids) -> set[int]:
    alive = set()
    for p in pids:
        try:
            os.kill(p, 0)
            with open(f"/proc/{p}/stat") as f:
                if f.read().split()[2] != "Z":
                    alive.add(p)
        except (ProcessLookupError, FileNotFoundError):
            pass
    return alive


def _wait_for(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig, dp", [(signal.SIGHUP, 1), (signal.SIGTERM, 2)])
def test_terminating_the_sweep_stops_the_running_config(tmp_path, sig, dp):
    """SIGHUP while a single-process config runs; SIGTERM while a 2-rank config runs (its baseline, run
    first, is cut by --timeout): either way the config's whole tree is gone and the sweep exits 128 + sig."""
    (tmp_path / "m.toml").write_text(f"[base]\nsteps = 100000\nseq_len = 16\nglobal_batch = 4\n[matrix]\ndp = [{dp}]\n")
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "bench.run", "--matrix", str(tmp_path / "m.toml"), "--out",
                          str(tmp_path / "o"), "--no-report", "--timeout", "6"], cwd=ROOT, env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    want = 2 if dp == 1 else 4  # the sweep's launcher and the config's process (and its two ranks)
    _wait_for(lambda: len(_descendants(p.pid)) >= want or None, timeout=60)
    time.sleep(2)
    tree = _descendants(p.pid)
    p.send_signal(sig)
    p.wait(timeout=60)
    assert p.returncode == 128 + sig, p.stderr.read()[-2000:]
    _wait_for(lambda: not _alive(tree) or None, timeout=30)


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_ranks_die_with_a_stopped_launcher_and_leave_nothing(tmp_path, sig):
    """The ranks die with their launcher; its temporary directory goes with a SIGTERM (it was left behind)
    and, after a SIGKILL, with the next run's start."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TMPDIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "llmopt.train", "--dp", "2", "--steps", "100000", "--seq-len", "16",
                          "--global-batch", "4", "--quiet"], cwd=ROOT, env=e, start_new_session=True)
    ranks = _wait_for(lambda: _descendants(p.pid) if len(_descendants(p.pid)) >= 2 else None)
    time.sleep(3)  # the ranks are training
    ranks = _descendants(p.pid)
    os.kill(p.pid, sig)
    p.wait()
    _wait_for(lambda: not _alive(ranks) or None, timeout=30)
    left = sorted(x.name for x in tmp_path.iterdir() if x.name.startswith("llmopt-ranks-"))
    if sig == signal.SIGTERM:
        assert p.returncode == 128 + signal.SIGTERM and left == [], left
        return
    assert len(left) == 1 and left[0].startswith(f"llmopt-ranks-{p.pid}-")
    r = subprocess.run([sys.executable, "-m", "llmopt.train", "--dp", "2", "--steps", "1", "--seq-len", "16",
                        "--quiet"], cwd=ROOT, env=e, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not any(x.name.startswith("llmopt-ranks-") for x in tmp_path.iterdir())  # the dead one's is gone


def test_a_killed_sweeps_launcher_directory_is_removed_by_the_next(tmp_path):
    """multiprocessing removes its launcher's directory (<tmp>/pymp-*) only at a clean exit: a SIGKILLed sweep
    left one behind for good."""
    (tmp_path / "m.toml").write_text("[base]\nsteps = 100000\nseq_len = 16\nglobal_batch = 4\n[matrix]\ndp = [1]\n")
    tmp = tmp_path / "t"
    tmp.mkdir()
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TMPDIR=str(tmp))
    p = subprocess.Popen([sys.executable, "-m", "bench.run", "--matrix", str(tmp_path / "m.toml"), "--out",
                          str(tmp_path / "o"), "--no-report"], cwd=ROOT, env=e, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(lambda: any(tmp.glob("pymp-*/llmopt-sweep.pid")) or None)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert any(tmp.glob("pymp-*"))
    r = bench("--matrix", "smoke", "--filter", "dp=9", "--out", str(tmp_path / "o2"), env={"TMPDIR": str(tmp)})
    assert r.returncode == 2 and not any(tmp.glob("pymp-*")), (r.stderr, list(tmp.iterdir()))


def test_write_json_leaves_no_tmp_on_a_failed_write(tmp_path, monkeypatch):
    from bench import hardware

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hardware.json, "dump", full)
    with pytest.raises(OSError):
        hardware.write_json(str(tmp_path / "x.json"), {"a": 1})
    assert os.listdir(tmp_path) == []


def test_an_empty_metrics_file_fails_the_config_not_the_sweep(tmp_path):
    from llmopt.core.run_metrics import read_metrics

    (tmp_path / "m.json").write_text("")
    metrics, error = read_metrics(str(tmp_path / "m.json"))
    assert metrics is None and "unreadable" in error
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))  # JSON, but not a run's metrics
    metrics, error = read_metrics(str(tmp_path / "other.json"))
    assert metrics is None and "unreadable" in error
    (tmp_path / "ok.json").write_text(json.dumps({"config": {"device": "cpu"}, "losses": [1.0], "tokens_per_s": 5.0}))
    metrics, error = read_metrics(str(tmp_path / "ok.json"))
    assert error == "" and metrics.losses == [1.0] and metrics.tokens_per_s == 5.0


def test_a_failed_resume_rewrite_keeps_the_original(done_sweep, tmp_path, monkeypatch):
    from bench import results

    out = copy_sweep(done_sweep, tmp_path / "out")
    before = (out / "results.csv").read_bytes()

    class FullDisk:
        def __init__(self, *a, **k):
            pass

        def writeheader(self):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.csv, "DictWriter", FullDisk)
    with pytest.raises(OSError):
        results.ResultFiles(str(out)).load(repair=True)
    assert (out / "results.csv").read_bytes() == before and not (out / "results.csv.tmp").exists()


def test_timing_warmup_reports_what_happened(tmp_path, cli):
    r = cli("-m", "llmopt.train", "--steps", "2", "--timing-warmup", "5", "--seq-len", "16", "--quiet",
            "--metrics-out", str(tmp_path / "m.json"), timeout=120)
    assert r.returncode == 0, r.stderr[-1000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["timing_warmup"] == 1 and len(m["step_time_ms"]) == 2  # one step left out, one timed


def test_an_oom_alone_exits_0_and_a_failure_1():
    from bench.run import _summary

    assert _summary([{"status": "ok"}, {"status": "oom"}, {"status": "diverged"}, {"status": "skipped"}]) == 0
    assert _summary([{"status": "ok"}, {"status": "timeout"}]) == 1
    assert _summary([{"status": "failed"}]) == 1


def test_a_convergence_report_survives_a_batch_where_every_run_failed(tmp_path):
    """The committed convergence reference with every batch-64 run turned into a failed row, the way older
    versions wrote it (no metrics, the config's target_loss 0): the report renders, says so, lists them."""
    import shutil

    from bench.report import write_report
    from bench.results import RESULT_COLUMNS

    ref = tmp_path / "conv"
    shutil.copytree(os.path.join(ROOT, "results", "reference", "cpu-convergence"), ref,
                    ignore=shutil.ignore_patterns("plots", ".lock"))
    config_cols = set(json.load(open(ref / "plan.json"))["plan"][0]["config"]) | {"config_id", "world_size",
                                                                                   "micro_batch", "wall_s", "phase"}
    with open(ref / "results.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["global_batch"] == "64":
            row.update({k: "" for k in row if k not in config_cols}, status="failed", error="boom", target_loss="0.0")
    with open(ref / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    report = open(write_report(str(ref))).read()
    assert "At batch 64 no run finished" in report and "| failed | boom |" in report
    assert "### tiny-v256, global batch 8 sequences: target" in report  # the other batch is still reported


def test_a_sweep_of_thousands_of_rows_gets_readable_plots(tmp_path):
    """bench.report on a 5,000-row sweep once drew 5,000 bars and 5,000 curves: 163 s and a 24 MB PNG. Now a
    large sweep's figures show the fastest configs and per-layout spreads: every PNG stays small."""
    import shutil

    from bench.report import write_report

    src = os.path.join(ROOT, "results", "reference", "cpu")
    shutil.copy(os.path.join(src, "env.json"), tmp_path)
    rows = list(csv.DictReader(open(os.path.join(src, "results.csv"))))
    steps = list(csv.DictReader(open(os.path.join(src, "steps.csv"))))
    with open(tmp_path / "results.csv", "w", newline="") as f, open(tmp_path / "steps.csv", "w", newline="") as g:
        w, ws = csv.DictWriter(f, list(rows[0])), csv.DictWriter(g, list(steps[0]))
        w.writeheader()
        ws.writeheader()
        for k in range(8):  # 8 copies of the full matrix: thousands of rows
            w.writerows({**r, "config_id": f"{r['config_id']}-{k}", "baseline_id": r["baseline_id"] and
                         f"{r['baseline_id']}-{k}"} for r in rows)
            ws.writerows({**s, "config_id": f"{s['config_id']}-{k}"} for s in steps)
    report = open(write_report(str(tmp_path))).read()
    assert f"Configs: {8 * len(rows)}" in report and 8 * len(rows) > 2000
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "plots").iterdir()}
    assert len(sizes) == 5 and max(sizes.values()) < 2**20, sizes
