import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_DIR = Path(ROOT) / "results" / "reference"
# every sweep under results/reference, those a reference holds several of (cpu-convergence-horizon/long) too
REFERENCES = sorted(str(p.parent.relative_to(REFERENCE_DIR)) for p in REFERENCE_DIR.rglob("results.csv"))
# the sweeps here check that MFU is in (0, 1], not its value: a tenth of a second per dtype for the peak
# (bench.hardware.PEAK_SECONDS_ENV), inherited by every sweep the tests start
os.environ.setdefault("LLMOPT_PEAK_SECONDS", "0.1")
# bench.run's --warm-up and --retime default off in the tests' sweeps: a loaded CI machine would re-time rows
# at random (changing the row counts tests assert) and every sweep would pay an extra run; the tests of those
# two features turn them on by flag (tests/test_noise.py)
os.environ.setdefault("LLMOPT_SWEEP_STEADY", "0")


def run_cli(*args, env=None, timeout=300):
    """Run a module of this repo in a fresh interpreter, one thread per rank."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def processes_with(token: str) -> list[int]:
    """PIDs of live processes whose environment (as exec'd) holds ``token``: a run's processes, forked or not,
    once it is given a token of its own."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if token.encode() in f.read():
                    with open(f"/proc/{pid}/stat") as st:
                        if st.read().rsplit(")", 1)[1].split()[0] != "Z":  # a zombie has already exited
                            pids.append(int(pid))
        except OSError:
            pass
    return pids


def bench_here(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """``python -m bench.run ARGS`` in this process: its main, with ``env`` added to the environment and ``cwd``
    as the working directory for the call, and its output captured; the same return code and output, without
    an interpreter's start-up (seconds on 2 cores). The configs still run in processes of their own, forked
    from the sweep's launcher, which then lives on in this process for later sweeps. Not for tests that find a
    config's processes by their environment (``processes_with``): forked from that launcher, they carry the
    environment it started with."""
    import contextlib
    import io

    from bench.run import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update({"OMP_NUM_THREADS": "1", **(env or {})})
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:  # argparse's own checks
                rc = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["bench.run", *args], rc, out.getvalue(), err.getvalue())


def one_error_line(r, code=2) -> str:
    """The one ``error:`` line a user's mistake gets (exit 2, nothing else on stderr, no traceback)."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """A plain ``pytest`` runs each benchmark once as a test, untimed (fast CI); ``pytest --benchmark-only``
    times them. (pytest-benchmark refuses --benchmark-disable together with --benchmark-only, so the
    choice is made here rather than in addopts.)"""
    if hasattr(config.option, "benchmark_disable") and not config.getoption("benchmark_only"):
        config.option.benchmark_disable = True


@pytest.fixture
def cli():
    return run_cli
