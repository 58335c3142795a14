"""Loading Hugging Face tokenizers, configs and weights by name or path, offline first.

``transformers``' own ``from_pretrained`` on a name that is not cached, on a machine without internet, retries
for half a minute or more (huggingface_hub's back-off, a warning per retry) before it gives up. Here a name is
looked up in the local cache first; only when it is not there is the Hub asked, and only after a quick check
(a few seconds) that its host answers at all. A failure is one ``ValueError`` naming the flag and the fix.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

HUB_PROBE_S = 3.0


def hub_reachable(timeout: float = HUB_PROBE_S) -> str | None:
    """None when the Hub's host accepts a connection within ``timeout``; else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or e})"


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers (a command's output is its own)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load(loader, name_or_path: str, what: str, **kw):
    """``loader(name_or_path, **kw)`` (a ``from_pretrained``), offline first; errors as one ValueError that
    starts with ``what`` (the flag and value the user gave, e.g. "--init hf:gpt2").

    Any exception the loader raises is the user's file or name (a truncated or random safetensors file is
    safetensors' own ``SafetensorError``, a pickle that is no state dict an ``UnpicklingError``): it becomes one
    line with its type, not a traceback."""
    quiet_transformers()
    local = os.path.isdir(name_or_path)
    try:
        return loader(name_or_path, local_files_only=True, **kw)
    except Exception as e:  # noqa: BLE001 -- see the docstring
        first = e
    if not local:
        why = hub_reachable()
        if why is None:
            try:
                return loader(name_or_path, **kw)
            except Exception as e:  # noqa: BLE001
                first = e
        else:
            raise ValueError(f"{what}: not in the local cache and {why}; point at a local copy "
                             f"(a directory saved with save_pretrained)") from None
    detail = f"{type(first).__name__}: " + (str(first).strip().splitlines() or [""])[0][:200]
    fix = ("check that it is a directory written by save_pretrained, whole" if local else
           "point at a local copy (a directory saved with save_pretrained)")
    raise ValueError(f"{what}: cannot load it ({detail}); {fix}") from None
