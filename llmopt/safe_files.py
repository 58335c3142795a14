"""Writing into directories people hand each other, without following what they planted there.

A results directory, a prepared data directory or a saved model may come from someone else (README: Security).
A symbolic link planted in one (``report.md`` -> ``~/.bashrc``, ``plots/`` -> another directory, a dangling
``logs/<id>.log``) would make an ordinary write land outside it. So every file llmopt and the harness write
under ``--out``/``--save`` is opened here: never through a link (``O_NOFOLLOW`` on the file, its directory
checked to be no link), and the entry points refuse a directory holding any link before they write anything
(``refuse_links``): refusing is clearer than writing around the link, and leaves the planted file as it was.

Stdlib only: a SLURM job's wrapper and the torch-free core use it.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import stat


class UnsafePath(ValueError):
    """A link (or a non-file) where llmopt was to write: one ``error:`` line, exit 2, nothing written."""


def refuse_links(root: str, what: str) -> None:
    """Refuse ``root`` if any path inside it is a symbolic link (``root`` itself may be one: the user named it).
    Walks without following links; a sweep's directory holds a few files per config, so this is cheap."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        return
    for here, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = os.path.join(here, name)
            if os.path.islink(path) and not _submitits_own(path):
                raise UnsafePath(f"{what}: {path} is a symbolic link (to {os.readlink(path)!r}); llmopt never "
                                 f"writes through links in a directory it was handed: remove the link, or copy "
                                 f"the directory with `cp -rL` if you trust its targets")


# submitit leaves one link per SLURM job in its folder: ``.submission_file_<uuid>.sh`` -> ``<job>_submission.sh``
# (an absolute path: a copied sweep's links point at the original). Nothing reads or writes through them, and a
# new submission never reuses a name, so these alone are let be; any other link is refused.
_SUBMITIT_LINK = re.compile(r"\.submission_file_[0-9a-f]{32}\.sh")


def _submitits_own(path: str) -> bool:
    return bool(_SUBMITIT_LINK.fullmatch(os.path.basename(path))) and \
        os.path.basename(os.path.dirname(path)) == "submitit"


def _check_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.islink(parent):
        raise UnsafePath(f"{parent} is a symbolic link; llmopt never writes through links: remove it")


def open_file(path: str, mode: str = "w", newline: str | None = None, encoding: str | None = "utf-8"):
    """``open(path, mode)`` for writing (``w``, ``a``, ``a+``, ``wb``, ``ab``) that refuses a link at ``path`` or
    at its directory, a dangling one included (``O_NOFOLLOW``: even one planted after a check is not followed).
    ``x`` in ``mode``: the file must not exist yet (``O_EXCL``). ``O_NONBLOCK``: a FIFO planted where a file goes
    is refused at once instead of blocking the open until something reads it (no effect on a regular file)."""
    _check_dir(path)
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    flags |= os.O_RDWR if "+" in mode else os.O_WRONLY
    flags |= os.O_APPEND if "a" in mode else os.O_EXCL if "x" in mode else os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):  # the last component is a link
            raise UnsafePath(f"{path} is a symbolic link; llmopt never writes through links: remove it") from None
        if e.errno == errno.ENXIO:  # a FIFO with no reader
            raise UnsafePath(f"{path} is not a regular file (a FIFO); remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted where a file goes
        os.close(fd)
        raise UnsafePath(f"{path} is not a regular file; remove it")
    py_mode = mode.replace("x", "w")
    if "b" in mode:
        return os.fdopen(fd, py_mode)
    return os.fdopen(fd, py_mode, newline=newline, encoding=encoding)


def makedirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` that refuses a link at ``path``."""
    if os.path.islink(path):
        raise UnsafePath(f"{path} is a symbolic link; llmopt never writes through links: remove it")
    os.makedirs(path, exist_ok=True)
    if os.path.islink(path):
        raise UnsafePath(f"{path} is a symbolic link; llmopt never writes through links: remove it")


def replace_text(path: str, text: str, newline: str | None = None) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file (never through a link) renamed into place. A
    failed write (a full disk) leaves the original and no ``.tmp`` behind."""
    tmp = path + ".tmp"
    try:
        with open_file(tmp, "w", newline=newline) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
    except OSError:
        if os.path.lexists(tmp) and not os.path.islink(tmp):
            os.remove(tmp)
        raise


def hold_lock(path: str):
    """An exclusive advisory lock (``flock``) on the file ``path`` (created, never through a link), held while the
    returned file stays open, with this process's PID written in it: ``(file, None)``; ``(None, the holder's PID)``
    when another process holds it. One writer per directory for a sweep and for a run's checkpoints."""
    import fcntl

    f = open_file(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        return None, holder
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f, None


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, atomically and never through a link."""
    buf = io.StringIO()
    json.dump(obj, buf, indent=1)
    replace_text(path, buf.getvalue())


def one_line(text) -> str:
    """A value read from a file someone handed us, fit to stand in one line of a report or a log: control
    characters (a newline that would start a line of its own) shown escaped."""
    s = str(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
