"""Training checkpoints: what a run needs to continue, saved with torch.distributed.checkpoint (DCP) so that a
checkpoint written under one layout loads under any other.

A checkpoint is a directory ``step-NNNNNNNN`` (the number of steps done) inside ``--checkpoint-dir``:

* DCP's files: every tensor under a layout-free name. ``model/<name>``: each parameter by its name in the
  single-device model (a pipeline's last stage's copy of the tied head is ``model/wte.weight``, as in the model
  it was cut from). ``optim/<name>/<key>[/<i>...]``: each leaf of that parameter's optimizer state (a number is
  a 0-dim tensor). FSDP2 and TP parameters and their states are DTensors, written as shards and resharded by
  DCP on load; whole-tensor states (``WholeTensors``' Adafactor and SOAP, torch's own optimizers in one
  process) are whole tensors. So the names do not depend on the layout, and neither do the shapes.
* ``train_state.json`` (rank 0; JSON, never a pickle): the format, the config it was saved under, the steps done,
  each optimizer parameter group's settings and counters (schedule-free's ``k``/``weight_sum``, SOAP's
  ``step``; a ``WholeTensors`` bucket's inner groups merged into their outer group), the learning-rate
  schedule, the loss scaler, the curve so far (losses, gradient norms, step times, the steps it started at), the
  evals, the noise-scale averages and rank 0's RNG state. Written last: a directory without it is not a
  checkpoint.

It is saved into ``.tmp-step-NNNNNNNN`` and renamed when every rank has written (a rename is atomic), so a
kill during a save leaves the previous checkpoint as it was; the last ``--checkpoint-keep`` are kept.

Loading: the optimizer's lazily made state is made first by one step with zero gradients at learning rate 0
(what ``torch.distributed.checkpoint.state_dict`` does for torch's optimizers), so that every state tensor
exists, in this layout's placement, to be loaded into in place. The batches of step s are a function of
(seed, s) alone (``llmopt.engines.micro_batches``), so the step count is the data position.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
import warnings

from llmopt.core.checkpoint_files import (  # noqa: F401 (the directory's format: dcp's API too)
    FORMAT,
    STATE_FILE,
    STEP_RE,
    CheckpointError,
    complete,
    read_state,
    resolve,
    step_dir,
)
from llmopt.safe_files import hold_lock, makedirs, open_file

# torch is imported inside the functions that write or read a checkpoint: the flags' checks stay torch-free

# What must agree between a checkpoint and the run resuming it (the layout, accumulation, learning rate and
# steps may change): the model's shape and vocabulary, the optimizer (its state), the precision (a loss
# scaler's state, and bf16 curves are not fp32's), the model implementation (its parameter names) and the seed
# (with the step, it says which batches come next).
MUST_MATCH = ("optimizer", "precision", "model_impl", "seed")


# Group entries that choose torch's kernels for this layout and precision (fused kernels in one process, foreach
# over DTensors): this run's own choice, not state to resume.
KERNEL_CHOICES = {"foreach", "fused", "capturable", "differentiable"}


def read_info(path: str) -> dict:
    """A checkpoint's train_state.json, checked for what resuming reads from it, and its DCP metadata."""
    info = read_state(path)
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"checkpoint {path}: DCP's .metadata is missing; the checkpoint is incomplete")
    read_metadata(path)  # refused here, before any training, when it is not DCP's
    return info


def check_compatible(cfg, path: str) -> dict:
    """Refuse (``CheckpointError``) a checkpoint whose model, vocabulary, optimizer, precision or model
    implementation differs from ``cfg``'s, or that has as many steps as the run or more; returns its info."""
    from llmopt.core.config import TrainConfig

    info = read_info(path)
    try:
        saved = TrainConfig.from_dict(info["config"], f"checkpoint {path}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for name in MUST_MATCH:
        if getattr(saved, name) != getattr(cfg, name):
            raise CheckpointError(f"checkpoint {path} was saved with --{name.replace('_', '-')} "
                                  f"{getattr(saved, name)}, this run has {getattr(cfg, name)}; use the same, or "
                                  f"start without --resume-from")
    a, b = saved.model_config, cfg.model_config
    for field in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        if getattr(a, field) != getattr(b, field):
            raise CheckpointError(f"checkpoint {path} holds a model with {field} {getattr(a, field)}, this run's "
                                  f"has {getattr(b, field)}; use the --preset and --data it was saved with")
    if info["step"] >= cfg.steps:
        raise CheckpointError(f"checkpoint {path} is after step {info['step']} of this run's {cfg.steps}; raise "
                              f"--steps/--max-tokens to train further")
    return info


def hold(root: str):
    """The lock of a checkpoint directory, held by the run writing it (an open file: released when the process
    ends). Another run on the same directory is refused."""
    makedirs(root)
    f, holder = hold_lock(os.path.join(root, ".lock"))
    if f is None:
        raise CheckpointError(f"--checkpoint-dir {root}: another run (PID {holder}) is writing checkpoints there; "
                              f"wait for it to end or use another directory")
    return f


# What a DCP .metadata file may name (torch 2.13 writes these): its own metadata classes, torch's dtypes,
# Size and layout, and the path type. torch's FileSystemReader unpickles the file with plain ``pickle.load``, so
# a planted one could run code on ``--resume-from``; ``SafeReader`` reads it with this list instead.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


def read_metadata(path: str):
    """A checkpoint's DCP metadata, unpickled with ``METADATA_GLOBALS`` only (a dtype such as ``torch.float32``
    too); anything else is a ``CheckpointError``."""
    import importlib
    import pickle

    import torch

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if name in METADATA_GLOBALS.get(module, ()) or (
                    module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return getattr(importlib.import_module(module), name)
            raise CheckpointError(f"checkpoint {path}: its .metadata names {module}.{name}, which a DCP checkpoint "
                                  f"does not hold; it was not written by torch.distributed.checkpoint, do not "
                                  f"load it")

    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            return Restricted(f).load()
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or corrupted pickle
        raise CheckpointError(f"checkpoint {path}: its .metadata is unreadable ({type(e).__name__}: {e}); resume "
                              f"from another checkpoint") from None


def safe_reader(path: str):
    """torch's ``FileSystemReader`` for ``path``, its metadata read by ``read_metadata`` (the tensors themselves
    it loads with ``weights_only``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # per-rank metadata files: not what llmopt writes
                raise CheckpointError(f"checkpoint {path}: per-rank metadata is not an llmopt checkpoint")
            metadata = read_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


# ----------------------------------------------------------------------------------------- the state
def _names(state) -> dict:
    """Each parameter of this rank -> its name in the single-device model (a pipeline's last stage holds the
    tied head as ``lm_head``: the embedding's name)."""
    tied = getattr(state.layout.module, "wte", None) is None and hasattr(state.layout.module, "lm_head")
    return {p: ("wte.weight" if tied and n == "lm_head.weight" else n)
            for n, p in state.layout.module.named_parameters()}


def _leaves(prefix: str, value, out: dict) -> None:
    """The tensors of one optimizer-state entry under DCP names: tensors as they are (DTensors too), numbers
    as 0-dim float64 tensors, lists element by element; None and anything else left out."""
    import torch

    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach()
    elif isinstance(value, bool | int | float):
        out[prefix] = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _leaves(f"{prefix}/{i}", v, out)


def _put_back(value, prefix: str, loaded: dict):
    """``value`` with its numbers replaced by their loaded ones (tensors were loaded in place)."""
    if isinstance(value, bool | int | float) and prefix in loaded:
        x = loaded[prefix].item()
        return type(value)(x) if not isinstance(value, bool) else bool(x)
    if isinstance(value, list):
        return [_put_back(v, f"{prefix}/{i}", loaded) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_put_back(v, f"{prefix}/{i}", loaded) for i, v in enumerate(value))
    return value


def tensors(state) -> dict:
    """This rank's part of a checkpoint for DCP: the model's parameters and every optimizer state leaf."""
    out = {}
    names = _names(state)
    for p, name in names.items():
        out[f"model/{name}"] = p.detach()
    for p, entry in state.optimizer.state.items():
        if p in names:
            for key, value in entry.items():
                _leaves(f"optim/{names[p]}/{key}", value, out)
    return out


def _plain(v):
    """A JSON value of an optimizer group's setting: tuples as lists, a 0-dim tensor as its number."""
    import torch

    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v if isinstance(v, bool | int | float | str) or v is None else None


def _groups(optimizer) -> list[tuple[int, dict]]:
    """(outer group index, group) of the optimizer's groups, then of its inner optimizers' (``inner_groups``)."""
    out = list(enumerate(optimizer.param_groups))
    inner = getattr(optimizer, "inner_groups", None)
    return out + (list(inner()) if inner is not None else [])


def group_settings(optimizer) -> list[dict]:
    """Each outer parameter group's settings, with what only its inner optimizers' groups hold (SOAP's step
    count) added: an inner group's copy of an outer setting (``WholeTensors`` copies the learning rate in at each
    step, so after a scheduler step it is the previous one) never replaces the outer's."""
    merged = [{} for _ in optimizer.param_groups]
    for i, g in _groups(optimizer):  # the outer groups first
        merged[i].update({k: _plain(v) for k, v in g.items() if k != "params" and k not in merged[i]})
    return merged


def _kind(v) -> str:
    """A JSON value's kind, a number being one kind (an int step count may be saved where a float is now)."""
    return "number" if isinstance(v, int | float) and not isinstance(v, bool) else type(v).__name__


def load_group_settings(optimizer, saved: list[dict], path: str) -> None:
    import torch

    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint {path} has {len(saved)} optimizer parameter groups, this run's optimizer "
                              f"{len(optimizer.param_groups)}; resume with the optimizer it was saved with")
    for i, g in _groups(optimizer):
        for k, v in saved[i].items():
            if k == "params" or k not in g or k in KERNEL_CHOICES:
                continue
            old = g[k]
            if _kind(_plain(old)) != _kind(v) and old is not None:
                raise ValueError(f"parameter group {i}'s {k} is {v!r}, where this optimizer has {old!r}")
            if isinstance(old, torch.Tensor):
                old.fill_(v)
            elif isinstance(old, tuple):
                g[k] = tuple(v)
            else:
                g[k] = v


# ----------------------------------------------------------------------------------------- save
class Saver:
    """``--checkpoint-dir DIR --checkpoint-every N --checkpoint-keep K``: a checkpoint every N steps and after
    the last (unless ``final`` is False: ``--no-final-checkpoint``), the last K kept. Its figures
    (``figures``) go into the run's metrics."""

    def __init__(self, root: str, every: int, keep: int, rank: int, final: bool = True):
        self.root, self.every, self.keep, self.rank, self.final = root, every, keep, rank, final
        self.saves: list[dict] = []

    def due(self, steps_done: int, last: bool) -> bool:
        return (self.every > 0 and steps_done % self.every == 0) or (last and self.final)

    def saved(self, steps_done: int) -> bool:
        return bool(self.saves) and self.saves[-1]["step"] == steps_done

    def save(self, state, steps_done: int, timed) -> None:
        """Collective. Writes the checkpoint after ``steps_done`` steps (``timed``: the loop's record so far)."""
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        final, tmp = step_dir(self.root, steps_done), os.path.join(self.root, f".tmp-step-{steps_done:08d}")
        if self.rank == 0:
            makedirs(self.root)
            for name in os.listdir(self.root):  # saves a kill interrupted
                if name.startswith(".tmp-step-"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            makedirs(tmp)
        _barrier()
        with warnings.catch_warnings():  # without a process group DCP warns that it assumes one process: it is one
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors(state), checkpoint_id=tmp, no_dist=not _distributed())
        if self.rank == 0:
            with open_file(os.path.join(tmp, STATE_FILE)) as f:
                json.dump(_info(state, steps_done, timed), f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):
                shutil.rmtree(final)  # the same step saved again (a resumed run): the new one replaces it
            os.rename(tmp, final)
            for old in complete(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        size = sum(os.path.getsize(os.path.join(final, n)) for n in os.listdir(final)) if self.rank == 0 else 0
        self.saves.append({"step": steps_done, "seconds": time.perf_counter() - t0, "bytes": size})

    def figures(self) -> dict:
        if not self.saves:
            return {}
        return {"checkpoints_saved": len(self.saves), "checkpoint_bytes": self.saves[-1]["bytes"],
                "checkpoint_save_s": sum(s["seconds"] for s in self.saves) / len(self.saves)}


# What SLURM sends a job it is about to stop: SIGUSR2 before its time limit (``--signal=USR2@S``, the signal
# submitit asks for) and SIGTERM when it is requeued, preempted or cancelled (then SIGKILL after KillWait).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopRequest:
    """With ``--checkpoint-dir``: SIGTERM or SIGUSR2 asks the run to stop at the end of the step under way, with
    a checkpoint, instead of dying mid-step (Lightning's SLURM auto-requeue does the same). A signal may reach
    the ranks between two different steps, so they agree on where to stop: ``agreed()`` is one MAX all-reduce of
    a one-element tensor a step (off the clock), and every rank stops after the same step."""

    def __init__(self):
        self.signum = 0
        self.previous = {sig: signal.signal(sig, self._note) for sig in STOP_SIGNALS}

    def _note(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self, device) -> int:
        """The signal some rank got (0: none); collective when there are several ranks."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_initialized()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _info(state, steps_done: int, timed) -> dict:
    from dataclasses import asdict

    import torch

    conv = timed.conv
    sched = None
    if state.scheduler is not None:  # its position: the rates come from the config and the restored groups
        sched = {"last_epoch": state.scheduler.last_epoch, "_last_lr": _plain(state.scheduler.get_last_lr())}
    noise = state.noise_scale
    return {
        "format": FORMAT, "config": asdict(state.cfg), "step": steps_done,
        "groups": group_settings(state.optimizer), "scheduler": sched,
        "scaler": {k: _plain(v) for k, v in state.scaler.state_dict().items()} if state.scaler is not None else None,
        "losses": timed.losses, "grad_norms": timed.grad_norms, "step_time_ms": timed.step_ms,
        "optimizer_ms": timed.optimizer_ms, "fp16_skipped": timed.fp16_skipped, "starts": timed.starts,
        "evals": [asdict(e) for e in conv.evals], "eval_seconds": conv.eval_seconds,
        "reached": conv.evals.index(conv.reached) if conv.reached is not None else None,
        "divergence_reference": conv._reference,
        "noise_scale": None if noise is None or noise.g2 is None else [float(noise.g2), float(noise.trace)],
        "rng": torch.get_rng_state().tolist(),
    }


# ----------------------------------------------------------------------------------------- load
def _init_optimizer_state(state) -> None:
    """Make every lazily created optimizer state tensor: one step with zero gradients at learning rate 0 (every
    parameter, every rank: the sharded optimizers' gathers are collective). The parameters and the state are
    then overwritten by the checkpoint's."""
    import torch

    opt = state.optimizer
    for p in state.layout.module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    lrs = [(g, g["lr"]) for _, g in _groups(opt)]
    for g, _ in lrs:
        g["lr"] = 0.0 if not isinstance(g["lr"], torch.Tensor) else g["lr"].fill_(0.0)
    opt.step()
    for g, lr in lrs:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)


def load(state, path: str, timed) -> int:
    """Collective. Load the checkpoint at ``path`` into the built ``state`` and the loop's record ``timed``;
    returns the steps done (the next step to run)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    info = read_info(path)
    _init_optimizer_state(state)
    wanted = tensors(state)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(wanted, storage_reader=safe_reader(path), no_dist=not _distributed())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's wrapper of each rank's failure is a BaseException
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint {path} cannot be loaded into this run ({first[-1] if first else e}); "
                              f"resume from another checkpoint or start without --resume-from") from None
    names = _names(state)
    for p, entry in state.optimizer.state.items():
        if p in names:
            for key in list(entry):
                entry[key] = _put_back(entry[key], f"optim/{names[p]}/{key}", wanted)
    try:  # train_state.json may come from someone else: a value of the wrong kind is its error, not a traceback
        _restore_settings(state, info, path)
        _restore_record(timed, info)
        torch.set_rng_state(torch.tensor(info["rng"], dtype=torch.uint8))
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is malformed ({type(e).__name__}: {e}); resume "
                              f"from another checkpoint") from None
    return info["step"]


def _restore_settings(state, info: dict, path: str) -> None:
    """The optimizer's group settings and counters, the schedule, the loss scaler and the noise-scale averages."""
    import torch

    load_group_settings(state.optimizer, info["groups"], path)
    if state.scheduler is not None and info.get("scheduler"):
        # the schedule's position (its learning rates come from the config and the restored groups)
        saved = info["scheduler"]
        step, last = saved.get("last_epoch"), saved.get("_last_lr")
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(last, list) or \
                not all(isinstance(x, int | float) and not isinstance(x, bool) for x in last):
            raise ValueError(f"the schedule's last_epoch {step!r} / _last_lr {last!r}")
        state.scheduler.load_state_dict({**state.scheduler.state_dict(), "last_epoch": step,
                                         "_last_lr": [float(x) for x in last]})
    if state.scaler is not None and info.get("scaler"):
        saved = info["scaler"]
        if not isinstance(saved, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                  for v in saved.values()):
            raise ValueError(f"the loss scaler's state {saved!r}")
        state.scaler.load_state_dict(saved)
    if state.noise_scale is not None and info.get("noise_scale"):
        g2, tr = info["noise_scale"]
        state.noise_scale.g2 = torch.tensor(g2, device=state.device)
        state.noise_scale.trace = torch.tensor(tr, device=state.device)


def _restore_record(timed, info: dict) -> None:
    from llmopt.convergence import EvalPoint

    timed.losses = [float(x) if x is not None else math.nan for x in info["losses"]]
    timed.grad_norms = list(info.get("grad_norms") or [])
    timed.step_ms = list(info.get("step_time_ms") or [])
    timed.optimizer_ms = list(info.get("optimizer_ms") or [])
    timed.fp16_skipped = int(info.get("fp16_skipped") or 0)
    # where the run started before (a checkpoint without them: once, at 0), and now at the checkpoint's step
    timed.starts = sorted({int(s) for s in info.get("starts") or [0]} | {int(info["step"])})
    conv = timed.conv
    conv.evals = [EvalPoint(**e) for e in info.get("evals") or []]
    conv.eval_seconds = float(info.get("eval_seconds") or 0.0)
    reached = info.get("reached")
    conv.reached = conv.evals[reached] if reached is not None else None
    conv._reference = info.get("divergence_reference")
