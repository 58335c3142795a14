import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
