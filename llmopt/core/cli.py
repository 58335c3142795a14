"""One command-line convention for every ``python -m`` entry point of llmopt and bench.

A user's mistake (a bad flag, a file that is not what it should be) is one ``error:`` line on stderr and exit
code 2: no usage block, no traceback. ``--help`` is argparse's, complete. Entry points build their parser with
``parser(...)`` and run their body through ``main(...)``, which turns the ``ValueError`` a check raises into
that line. Every exit code llmopt and the harness give is defined here; every ``error:`` line is printed by
``error`` (tests/test_cli.py keeps it so).
"""
from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from typing import NoReturn

# Exit codes: the harness maps them to row statuses (bench.executors.status_of); 1 is any other failure.
USER_ERROR = 2     # a user's mistake, found before or while training: one error: line
DIVERGED = 3       # the loss diverged (llmopt.convergence): one error: line saying at which step and why
OUT_OF_MEMORY = 4  # a rank ran out of memory (or the kernel's OOM killer took it)
PREEMPTED = 75     # stopped by SIGTERM or SIGUSR2 after writing a checkpoint: the same command continues it
                   # (75 is sysexits' EX_TEMPFAIL, "try again later": SLURM requeues the job and it resumes)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage block
        self.exit(USER_ERROR, f"error: {message} (see --help)\n")


def parser(prog: str, description: str, **kw) -> ArgumentParser:
    return ArgumentParser(prog=prog, description=description, **kw)


def error(message: str, code: int = USER_ERROR) -> int:
    """Print the one ``error:`` line of a failure (by default a user's mistake); returns its exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


def main(body: Callable[[], int], user_errors: tuple[type[BaseException], ...] = (ValueError,)) -> int:
    """Run an entry point's body: the exceptions in ``user_errors`` become one ``error:`` line and exit 2."""
    try:
        return body()
    except user_errors as e:
        return error(str(e))


def exit(code: int | None) -> NoReturn:
    """``sys.exit(code)`` for a ``python -m`` entry point, after ``gc.freeze()``: the interpreter's shutdown then
    skips collecting again the objects torch and its imports made, the bulk of a torch process's exit, which
    every config and sweep a test or a harness waits for pays; atexit handlers and the closing and flushing of
    files run as before."""
    gc.freeze()
    sys.exit(code)
