"""A training checkpoint's directory, as files (torch-free): ``DIR/step-NNNNNNNN`` holding DCP's files and
``train_state.json``; finding the latest complete one and reading its state file. What a checkpoint holds and
how it is saved and loaded is ``llmopt.dcp``; this is what the flags' checks (``--resume-from``, ``--init
ckpt:``) read before torch is imported."""
from __future__ import annotations

import json
import os
import re

STATE_FILE = "train_state.json"  # not --save's llmopt.json: a saved model is not a checkpoint
FORMAT = 1
STEP_RE = re.compile(r"step-(\d{8})")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: one line naming what differs, exit 2."""


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def complete(root: str) -> list[str]:
    """The complete checkpoints in ``root``, oldest first (a ``.tmp-`` directory, or one without its
    train_state.json, is a save that did not finish)."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if STEP_RE.fullmatch(n))
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, STATE_FILE))]


def resolve(path: str, flag: str = "--resume-from") -> str:
    """A checkpoint directory: ``path`` itself (it holds train_state.json) or the latest complete one inside it."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    found = complete(path)
    if not found:
        raise CheckpointError(f"{flag} {path}: not a checkpoint (no {STATE_FILE}) and holds none (no complete "
                              f"step-NNNNNNNN inside); pass a --checkpoint-dir a run wrote")
    return found[-1]


def read_state(path: str) -> dict:
    """A checkpoint's train_state.json (``path``: a step directory), checked for what a resume or ``--init
    ckpt:`` reads from it."""
    file = os.path.join(path, STATE_FILE)
    try:
        if os.path.getsize(file) > 256 * 2**20:
            raise ValueError("larger than 256 MiB")
        with open(file) as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is unreadable ({e}); resume from another "
                              f"checkpoint") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not an llmopt checkpoint of format {FORMAT}")
    step, losses = info.get("step"), info.get("losses")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1 or not isinstance(losses, list) or \
            len(losses) != step or not isinstance(info.get("config"), dict) or \
            not isinstance(info.get("groups"), list):
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is malformed (step, losses, config or groups); "
                              f"resume from another checkpoint")
    return info
