"""What one optimizer step does, counted: the operations it dispatches and the bytes they move, for the cost
model to price (``bench.advisor.costmodel.update_seconds``).

An optimizer's update on a small model is not FLOP-bound but dispatch- and memory-bound: torch's AdamW is 4
fused calls, Lion 416 per-tensor operations, LAMB over 1,000, and each operation on a DTensor (FSDP2's and
TP's shards) costs DTensor's sharding propagation besides the kernel. Those counts are facts of the optimizer's
code, not of the hardware, so they are counted, not declared: one step of every optimizer is run on a stand-in
of the model (the same layers and heads; width, vocabulary and context capped, so that counting a GPT-2 takes
seconds) under a ``TorchDispatchMode``, which sees every top-level aten operation with its arguments. The
sharded profile runs the stand-in under FSDP2 on a one-rank mesh: the same code paths a sharded layout takes
(DTensor dispatch, the whole-tensor gathers of ``llmopt.optim``), without a second process. An optimizer added
as a file (``llmopt.optimizers``) is counted like the others.

Counting imports torch and starts a process group, so it runs in a subprocess (``python -m
bench.advisor.update``), once for every optimizer, and is cached per stand-in, kernel choice, torch version and
optimizer files in ``llmopt``'s cache directory.

Not counted: the matmuls' own work (the spec's ``update_flops`` prices that), and what the stand-in's capped
width changes (SOAP's unpreconditioned sides above 10,000, the eigenbasis refresh every 10 steps).
"""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from llmopt.core.shapes import GPTConfig

# The stand-in's caps: wide enough that every tensor kind exists as in the real model, small enough to step
# every optimizer (SOAP's eigendecompositions included) in about a second.
MAX_WIDTH, MAX_VOCAB, MAX_CONTEXT = 128, 1024, 256
# Views, metadata and profiler markers: no kernel, not counted.
FREE_OPS = frozenset({
    "detach", "view", "_unsafe_view", "t", "transpose", "alias", "expand", "as_strided", "slice", "select",
    "unsqueeze", "squeeze", "reshape", "lift_fresh", "permute", "split", "split_with_sizes", "unbind", "chunk",
    "_record_function_enter_new", "_record_function_exit", "is_same_size",
})
# Dispatched, but moving no tensor's worth of data: allocations and reading a scalar back (``.item()``).
NO_BYTES_OPS = frozenset({"empty_like", "new_empty", "new_empty_strided", "empty", "empty_strided",
                          "_local_scalar_dense"})
# Operations whose time is FLOPs (priced by the spec's update_flops), not bytes.
MATMUL_OPS = frozenset({"mm", "addmm", "bmm", "matmul", "baddbmm", "_linalg_eigh", "linalg_eigh", "linalg_qr",
                        "geqrf", "linalg_householder_product", "_linalg_svd", "linalg_svd"})
PROFILE_VERSION = 3  # bump when what is counted changes: cached profiles of another version are recounted


@dataclass(frozen=True)
class UpdateProfile:
    """One optimizer step on the stand-in, per parameter tensor and per parameter value of the stand-in."""
    plain_ops: float           # operations on plain tensors, per parameter tensor
    dtensor_calls: float       # operations on DTensors, per parameter tensor (each pays DTensor's dispatch)
    dtensor_ops: float         # the same, each counted once per DTensor in its longest list (a foreach call
                               # propagates sharding and runs tensor by tensor), per parameter tensor
    plain_bytes: float         # bytes read and written by the plain tensors' non-matmul operations, per value
    dtensor_bytes: float       # the same for DTensor operations, of the whole tensor (a rank moves its shard's)


def sharded(cfg) -> bool:
    """Whether ``cfg``'s parameters are DTensor shards (FSDP2 or TP): which profile prices its update."""
    return (cfg.dp > 1 and cfg.dp_mode == "fsdp") or cfg.tp > 1


def stand_in(model: GPTConfig) -> GPTConfig:
    """The model the counting runs: the same layers and heads, width and vocabulary capped."""
    width = min(model.n_embd, max(MAX_WIDTH // model.n_head, 1) * model.n_head)
    return GPTConfig(n_layer=model.n_layer, n_head=model.n_head, n_embd=width,
                     vocab_size=min(model.vocab_size, MAX_VOCAB), block_size=min(model.block_size, MAX_CONTEXT))


@functools.cache
def _torch_version() -> str:
    """torch's installed version, read once (a metadata scan per call was most of a key's cost)."""
    import importlib.metadata as md

    try:
        return md.version("torch")
    except md.PackageNotFoundError:
        return "?"


def cache_key(model: GPTConfig, impl: str, sharded: bool) -> str:
    import llmopt.optimizers
    from llmopt.optimizers import PLUGINS_ENV

    s = stand_in(model)
    # the optimizers' code by content, llmopt's own (the specs and llmopt/optim.py, no torch imported here) and
    # the plugins': an edited file is counted again, a fresh clone of the same code is not
    specs = os.path.dirname(llmopt.optimizers.__file__)
    own = [os.path.join(os.path.dirname(specs), "optim.py"), *sorted(glob.glob(os.path.join(specs, "*.py")))]
    files = [f"{os.path.basename(p)}@{_digest(p)}" for p in own + os.environ.get(PLUGINS_ENV, "").split(os.pathsep)
             if p]
    return (f"v{PROFILE_VERSION}|torch {_torch_version()}|L{s.n_layer} H{s.n_head} C{s.n_embd} V{s.vocab_size} "
            f"T{s.block_size}|{impl}|{'sharded' if sharded else 'plain'}|{os.pathsep.join(files)}")


def _digest(path: str) -> str:
    """A short hash of a file's bytes ("-" where it cannot be read: the spec loader reports that)."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        return "-"


def _cache_path() -> str:
    from llmopt.prepare import cache_dir

    return os.path.join(cache_dir(), "update-profiles.json")


def profiles(model: GPTConfig, impl: str, sharded: bool, names=None, log=None) -> dict[str, UpdateProfile | str]:
    """The profiles of the optimizers ``names`` (every one by default) on ``model``'s stand-in: optimizer name ->
    profile, or the one-line reason it could not be counted. From the cache; the missing ones are counted now,
    together, in one subprocess."""
    from llmopt.optimizers import names as all_names
    from llmopt.safe_files import makedirs, replace_text

    names = list(all_names() if names is None else names)
    key, path = cache_key(model, impl, sharded), _cache_path()
    missing = [n for n in names if n not in _cached(path, key)]
    if missing:
        if log is not None:
            log(f"counting the steps of {', '.join(missing)} ({'sharded' if sharded else 'plain'} tensors); "
                f"cached in {path}")
        spec = json.dumps({"model": asdict(stand_in(model)), "impl": impl, "sharded": sharded, "names": missing})
        try:
            done = subprocess.run([sys.executable, "-m", "bench.advisor.update", spec], capture_output=True,
                                  text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise RuntimeError("counting the optimizers' steps took over 10 minutes; not priced") from None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"counting the optimizers' steps failed: {tail}")
        cache = _read_cache(path)  # another sweep may have added its own meanwhile
        cache[key] = {**_cached(path, key), **json.loads(done.stdout.strip().splitlines()[-1])}
        makedirs(os.path.dirname(path))
        replace_text(path, json.dumps(cache, indent=1, sort_keys=True))
    counted = _cached(path, key)
    return {n: (UpdateProfile(**counted[n]) if isinstance(counted.get(n), dict) else str(counted.get(n)))
            for n in names}


def _cached(path: str, key: str) -> dict:
    """The cache's profiles under ``key`` (an entry that is not a table counts as none)."""
    entry = _read_cache(path).get(key)
    return entry if isinstance(entry, dict) else {}


def _read_cache(path: str) -> dict:
    """The cached profiles; an unreadable cache counts as empty (it is rewritten whole)."""
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


# ------------------------------------------------------------------------------- the counting subprocess
def _count(model: GPTConfig, impl: str, sharded: bool, names: list[str]) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode  # where torch keeps dispatch modes (no public alias)

    from llmopt.model import GPT
    from llmopt.optim import build_optimizer

    def nbytes(x) -> int:
        """Bytes of a tensor (a DTensor's whole tensor: on the one-rank mesh, its shard) or of a list of them."""
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(nbytes(y) for y in x)
        return 0

    def dtensors(x) -> int:
        if isinstance(x, DTensor):
            return 1
        if isinstance(x, (list, tuple)):
            return sum(isinstance(y, DTensor) for y in x)
        return 0

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.plain_ops = self.dtensor_calls = self.dtensor_ops = self.plain_bytes = self.dtensor_bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            if name in FREE_OPS:
                return out
            inputs = [*args, *kwargs.values()]
            width = max((dtensors(a) for a in inputs), default=0)
            if width:
                self.dtensor_calls += 1
                self.dtensor_ops += width
            else:
                self.plain_ops += 1
            if name not in MATMUL_OPS and name not in NO_BYTES_OPS:
                # the arguments an operation writes in place, from its schema's alias annotations (Tensor(a!)):
                # OpOverload has no public accessor for them; tests/test_costmodel_update.py fails (AdamW's
                # bytes) if this stops finding them
                written = sum(nbytes(a) for a, arg in zip(args, func._schema.arguments)
                              if arg.alias_info is not None and arg.alias_info.is_write)
                moved = nbytes(inputs) + written + (0 if name.endswith("_") else nbytes(out))
                if width:
                    self.dtensor_bytes += moved
                else:
                    self.plain_bytes += moved
            return out

    torch.set_num_threads(1)
    mesh = None
    if sharded:  # FSDP2 on a one-rank mesh: DTensor's paths without a second process
        from torch.distributed.device_mesh import init_device_mesh

        from llmopt.distributed.data_parallel import apply_fsdp

        store = tempfile.mkdtemp(prefix="llmopt-count-")
        dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
    out = {}
    for name in names:
        try:
            torch.manual_seed(0)
            model_ = GPT(model)
            params = list(model_.parameters())
            values = sum(p.numel() for p in params)
            if mesh is not None:
                apply_fsdp(model_, mesh, list(model_.h.values()))
            optimizer = build_optimizer(name, model_, 1e-4, 0.01, impl, True)
            for p in model_.parameters():
                p.grad = torch.full_like(p, 1e-3)
            for _ in range(2):  # the first steps create state and take one-off paths (SOAP starts its bases)
                optimizer.step()
            c = Count()
            with c:
                optimizer.step()
            out[name] = {"plain_ops": c.plain_ops / len(params), "dtensor_calls": c.dtensor_calls / len(params),
                         "dtensor_ops": c.dtensor_ops / len(params),
                         "plain_bytes": c.plain_bytes / values, "dtensor_bytes": c.dtensor_bytes / values}
        except Exception as e:  # an optimizer that cannot step here is left unpriced, with the reason
            out[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Count every optimizer's step on a model (JSON in, JSON out); "
                                            "bench's cost model runs it.")
    p.add_argument("spec", help='{"model": GPTConfig fields, "impl": ..., "sharded": true|false, "names": [...]}')
    a = p.parse_args(argv)
    spec = json.loads(a.spec)
    result = _count(GPTConfig(**spec["model"]), spec["impl"], bool(spec["sharded"]), list(spec["names"]))
    print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # as llmopt.train's ranks: skip gloo's teardown


if __name__ == "__main__":
    from llmopt.core import cli

    cli.exit(main())
