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
