"""Temporary files and directories that a killed process cannot leave behind for good.

Each one carries the PID of the process that made it (``<prefix><pid>-...`` or ``<path>.tmp-<pid>``). A kill
with SIGKILL (or a crash) leaves it; the next run that makes one of the same kind removes every leftover whose
PID no longer runs. A PID that is alive again (reused by an unrelated process) keeps its leftover: removing
another process's files would be worse than a stale directory.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_dead(pattern: str, pid_of) -> list[str]:
    """Remove the paths matching ``pattern`` (a glob) whose ``pid_of(path)`` is a PID that no longer runs;
    returns what was removed. ``pid_of`` returns None for a path it does not recognise (left alone)."""
    removed = []
    for path in glob.glob(pattern):
        pid = pid_of(path)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                continue
        removed.append(path)
    return removed


def sibling_tmp(path: str) -> str:
    """``<path>.tmp-<pid>``: where ``path`` is built before it is renamed into place. Leftovers of dead
    processes beside it (a killed earlier attempt at the same path) are removed first."""
    path = os.path.abspath(path)
    remove_dead(glob.escape(path) + ".tmp-*", lambda p: _int(p.rsplit(".tmp-", 1)[1]))
    return f"{path}.tmp-{os.getpid()}"


def private_dir(prefix: str) -> str:
    """A new directory ``<tmp>/<prefix><pid>-XXXX``, after removing those of ``prefix`` whose process died."""
    root = tempfile.gettempdir()
    remove_dead(os.path.join(glob.escape(root), glob.escape(prefix) + "*"),
                lambda p: _int(os.path.basename(p)[len(prefix):].split("-", 1)[0]))
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root)


def _int(text: str) -> int | None:
    return int(text) if re.fullmatch(r"[0-9]+", text) else None


def check_writable_dir(path: str, flag: str, may_exist: bool) -> None:
    """Before any work: ``path`` can become (or, with ``may_exist``, already is) a directory this process can
    write. Checked by really creating it, or a file inside it, and removing that again: permission bits alone
    do not tell (root, /proc, /sys, a read-only mount). One ValueError naming ``flag`` otherwise."""
    full = os.path.abspath(path)
    if os.path.lexists(full):
        if not may_exist:
            raise ValueError(f"{flag} {path!r} already exists; remove it or choose another directory")
        if not os.path.isdir(full):
            raise ValueError(f"{flag} {path!r} is a file; pass a directory")
        probe = os.path.join(full, f".llmopt-probe-{os.getpid()}")
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"{flag} {path!r} cannot be written ({e.strerror}); choose another place") from None
        return
    if not os.path.isdir(os.path.dirname(full)):
        raise ValueError(f"{flag}: the parent of {path!r} does not exist; create it first")
    try:
        os.mkdir(full)
        os.rmdir(full)
    except OSError as e:
        raise ValueError(f"{flag} {path!r} cannot be created ({e.strerror}); choose another place") from None


def check_writable_file(path: str, flag: str, inputs=()) -> None:
    """Before any work: the output file can be written (tried for real), is a regular file (or new), and is
    none of ``inputs``. One ValueError naming ``flag`` otherwise."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"{flag} {path!r} is a directory; pass a file name")
    if os.path.exists(full) and not os.path.isfile(full):
        raise ValueError(f"{flag} {path!r} is not a regular file (a FIFO or device); pass a file name")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag}: directory of {path!r} does not exist; create it first")
    for other in inputs:
        if other and os.path.exists(other) and os.path.exists(full) and os.path.samefile(other, full):
            raise ValueError(f"{flag} {path!r} is the input {other!r}; write the output somewhere else")
    existed = os.path.exists(full)
    try:  # a real open: permissions alone do not tell (root, /proc, a read-only mount)
        open(full, "a").close()
    except OSError as e:
        raise ValueError(f"{flag} {path!r} cannot be written ({e.strerror}); choose another place") from None
    if not existed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(full)
