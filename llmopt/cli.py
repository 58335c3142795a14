"""One command-line convention for every ``python -m`` entry point of llmopt and bench.

A user's mistake (a bad flag, a file that is not what it should be) is one ``error:`` line on stderr and exit
code 2: no usage block, no traceback. ``--help`` is argparse's, complete. Entry points build their parser with
``parser(...)`` and run their body through ``main(...)``, which turns the ``ValueError`` a check raises into
that line.
"""
from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from typing import NoReturn

USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage block
        self.exit(USER_ERROR, f"error: {message} (see --help)\n")


def parser(prog: str, description: str, **kw) -> ArgumentParser:
    return ArgumentParser(prog=prog, description=description, **kw)


def error(message: str) -> int:
    """Print a user's mistake as the one ``error:`` line; returns the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR


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
