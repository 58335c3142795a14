"""Every optimizer llmopt knows, one file each: this package holds the specs, one ``OptimizerSpec`` per module
(``SPEC``), read by everything that used to know optimizers by name: the config's choices, default learning
rates and kernel families, ``llmopt.optim.build_optimizer``, the memory prediction (``llmopt.memory``), the
advisor's cost model (``bench.advisor.costmodel``), the matrices' learning-rate centres and the report's order.

Adding an optimizer is one new file: a module here, or a file anywhere named in ``LLMOPT_OPTIMIZERS`` (paths
separated by ``os.pathsep``; inherited by every process a sweep starts), that defines ``SPEC``. A spec is
read without torch (the config refuses a bad flag before torch is imported), so ``build`` imports what it
needs when it is called. The pattern is torchtitan's name-to-builder and Hugging Face's
``TYPE_TO_SCHEDULER_FUNCTION``, with the facts the memory and cost models need kept beside the builder.

The memory and cost figures are functions of ``Stage``, one rank's view of one pipeline stage: what the rank
holds (its shards) and the whole shapes behind them. An optimizer whose update is elementwise runs on the
shards (``llmopt.optim.shard_optimizer``); one that needs whole tensors (Muon's orthogonalisation, SOAP's
preconditioners, Adafactor's statistics on a 2-D mesh) says which in ``gathers`` and is wrapped in
``llmopt.optim`` to gather them.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import pkgutil
from dataclasses import dataclass
from typing import Callable

PLUGINS_ENV = "LLMOPT_OPTIMIZERS"
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


@dataclass(frozen=True)
class Stage:
    """One rank of one pipeline stage, as an optimizer's memory and cost formulas see it."""
    values: int                           # parameter values this rank holds (TP and FSDP2 shards counted per rank)
    hidden_values: int                    # of those, values of the hidden matrices (attention and MLP projections)
    tensors: tuple[tuple[int, ...], ...]  # the whole shape of every parameter tensor of the stage (tied head once)
    hidden: tuple[tuple[int, int], ...]   # the whole shapes of the stage's hidden matrices
    shards: int                           # ranks each tensor is split over (tp x FSDP2's dp); 1: whole tensors
    steps: int = 0                        # the run's optimizer steps: a transient only some steps pay counts
                                          # where the run reaches one (SOAP's eigenbasis refresh every 10)
    mesh_dims: int = 1                    # dimensions of the parameters' mesh (FSDP2 over TP: 2, strided; DDP
                                          # beside TP: 2, the TP shards replicated over dp)


def nothing(stage: Stage) -> int:
    return 0


def moments(k: int) -> Callable[[Stage], int]:
    """State of ``k`` fp32 tensors the size of each parameter, sharded as the parameters are."""
    def state_bytes(stage: Stage) -> int:
        return k * 4 * stage.values
    return state_bytes


def all_tensors(stage: Stage) -> list[tuple[int, ...]]:
    return list(stage.tensors)


def hidden_matrices(stage: Stage) -> list[tuple[int, ...]]:
    return list(stage.hidden)


def largest(shapes) -> int:
    return max((math.prod(s) for s in shapes), default=0)


def ns_flops(shape: tuple[int, ...]) -> int:
    """Muon's cost, read by its spec and by ``llmopt.optim.owners`` (which balances it over ranks): one
    Newton-Schulz iteration's multiply-adds on an (m x n) matrix, m <= n after torch's transpose: X X^T (m^2 n),
    the polynomial in it (m^3) and its product with X (m^2 n)."""
    m, n = sorted(shape)
    return m * m * (2 * n + m)


def bucket_indices(sizes: list[int], times: int = 1) -> list[list[int]]:
    """Indices of ``sizes`` in order, cut into buckets of at most ``times`` the largest size (the largest
    alone): how ``llmopt.optim.size_buckets`` groups tensors for one gather each, and how the cost model counts
    those gathers."""
    cap = times * max(sizes, default=0)
    buckets: list[list[int]] = []
    size = cap + 1
    for i, n in enumerate(sizes):
        if size + n > cap:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += n
    return buckets


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything llmopt knows about one optimizer."""
    name: str                 # --optimizer's value, the results' optimizer column, the report's label
    about: str                # one line: what it is and where its update comes from (help, README table)
    build: Callable           # build(model, lr, weight_decay, impl, fused_ok) -> torch.optim.Optimizer
    default_lr: float         # --lr when not given: the loss falls quickly on the tiny preset
    lr_centre: float          # where the convergence matrices' learning-rate grid is centred (measured: results/README)
    impls: tuple[str, ...] = ("for-loop",)       # torch's kernel families it has (--optimizer-impl)
    state_bytes: Callable[[Stage], int] = moments(2)    # optimizer state one rank keeps
    transient_bytes: Callable[[Stage], int] = nothing   # buffers alive only while it steps (the update's peak)
    heavy_every: int = 0      # its heaviest step recurs every N of its steps, the first at N + 1 (SOAP's eigenbasis
                              # refresh): a run that reaches one has its memory measured at one (0: every step alike)
    update_flops: Callable[[Stage], float] = nothing    # FLOPs beyond the elementwise update (Newton-Schulz, ...)
    gathers: Callable[[Stage], list] = lambda stage: []  # whole shapes all-gathered per step under FSDP2/TP
    gathered_per_tensor: int = 1      # tensors gathered per shape (a tensor and its gradient: 2)
    bucket_times: Callable[[int], int] = lambda ranks: 1  # a gather bucket's cap, in largest tensors, on `ranks`
    splits_work: bool = False  # on a 1-D mesh each rank does the whole-tensor work of its share (all-to-alls)
    reductions: int = 0       # small all-reduces per step and set of sharded mesh dimensions (norms over shards)
    mesh_reductions: int = 0  # all-reduces per step over a 1-D mesh, every tensor's sums in one (Adafactor's)
    accelerate: bool = True   # a torch.optim optimizer that --engine accelerate can wrap
    lr_schedules: tuple[str, ...] | None = None         # the --lr-schedule values it takes (None: every one)
    packages: tuple[tuple[str, str], ...] = ()          # (module, pip name) its build imports beyond torch
    reproducible: bool = True  # its loss curve keeps to rounding when only the gradients' summation order changes
    # some parameters are stepped by AdamW (Muon: embeddings, head, gains, biases); its build takes adamw_lr=,
    # their rate (--adamw-lr; a convergence study sets AdamW's tuned rate)
    adamw_part: bool = False
    order: int = 1000         # where it sorts in tables and matrices (llmopt's own: 10 to 90, in tens)

    @property
    def whole_tensors(self) -> bool:
        """Whether its update needs whole tensors under some sharded layout (gathered, or their statistics
        summed), on a stage of one 2 x 2 matrix split by FSDP2 over TP."""
        return bool(self.gathers(Stage(values=4, hidden_values=4, tensors=((2, 2),), hidden=((2, 2),), shards=4,
                                       mesh_dims=2)))


def _check(spec, where: str) -> OptimizerSpec:
    if not isinstance(spec, OptimizerSpec):
        raise ValueError(f"{where}: SPEC must be an llmopt.optimizers.OptimizerSpec, not {type(spec).__name__}")
    if not spec.name or set(spec.name) - NAME_CHARS or not callable(spec.build):
        raise ValueError(f"{where}: optimizer name {spec.name!r} must be lower-case letters, digits and '-', "
                         f"with a callable build")
    if not (spec.default_lr > 0 and spec.lr_centre > 0):
        raise ValueError(f"{where}: optimizer {spec.name!r} needs a positive default_lr and lr_centre")
    return spec


def _load_file(path: str) -> OptimizerSpec:
    where = f"{PLUGINS_ENV} {path!r}"
    if not (path.endswith(".py") and os.path.isfile(path)):
        raise ValueError(f"{where}: no such Python file; name .py files defining SPEC, separated by {os.pathsep!r}")
    module_name = "llmopt_optimizer_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    found = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(found)
    try:
        found.loader.exec_module(module)
    except Exception as e:  # the user's file: its mistake is one line, not a traceback through llmopt
        raise ValueError(f"{where}: could not be loaded ({type(e).__name__}: {e}); fix or remove it") from None
    if not hasattr(module, "SPEC"):
        raise ValueError(f"{where}: defines no SPEC (an llmopt.optimizers.OptimizerSpec)")
    return _check(module.SPEC, where)


@functools.cache
def registry() -> dict[str, OptimizerSpec]:
    """Every optimizer by name, in ``order``: this package's modules, then the files named in LLMOPT_OPTIMIZERS."""
    specs = [_check(importlib.import_module(f"{__name__}.{m.name}").SPEC, f"{__name__}.{m.name}")
             for m in pkgutil.iter_modules(__path__)]
    specs += [_load_file(p) for p in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if p]
    out: dict[str, OptimizerSpec] = {}
    for s in sorted(specs, key=lambda s: (s.order, s.name)):
        if s.name in out:
            raise ValueError(f"{PLUGINS_ENV}: optimizer {s.name!r} is defined twice; rename one")
        out[s.name] = s
    return out


def names() -> tuple[str, ...]:
    return tuple(registry())


def in_order(present) -> list[str]:
    """The optimizer names in ``present`` in the registry's order; names it does not hold (rows of an optimizer
    from a file this process was not given) after them, alphabetically."""
    present, known = set(present), names()
    return [n for n in known if n in present] + sorted(present - set(known))


def spec(name: str) -> OptimizerSpec:
    try:
        return registry()[name]
    except KeyError:
        raise ValueError(f"--optimizer: unknown value {name!r}; choose one of {', '.join(names())}") from None


def check_installed(spec: OptimizerSpec) -> None:
    """A ValueError naming the pip package when one the optimizer is built from is missing (looked up, not
    imported: no torch yet)."""
    for module, pip_name in spec.packages:
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--optimizer {spec.name} needs the package {pip_name}, which is not installed: "
                             f"pip install {pip_name} (or choose another --optimizer)")


def param_mesh_dims(cfg) -> int:
    """Dimensions of the mesh a run's parameters live on: dp where FSDP2 shards over it or DDP beside TP
    replicates TP's shards over it (``apply_replicate``), and tp; 1 for whole tensors."""
    fsdp = cfg.dp > 1 and cfg.dp_mode == "fsdp"
    return max(1, (cfg.dp > 1 and (fsdp or cfg.tp > 1)) + (cfg.tp > 1))


def stage_view(cfg, stage: int, values: int) -> Stage:
    """``Stage`` of pipeline stage ``stage`` for a run of ``cfg`` whose rank there holds ``values``."""
    from llmopt.core.shapes import hidden_matrix_params, stage_matrices, stage_tensors

    fsdp = cfg.dp if cfg.dp > 1 and cfg.dp_mode == "fsdp" else 1
    hidden = hidden_matrix_params(cfg, stage)
    return Stage(values=values, hidden_values=-(-hidden // fsdp), tensors=tuple(stage_tensors(cfg, stage)),
                 hidden=tuple(stage_matrices(cfg, stage)), shards=fsdp * cfg.tp, steps=cfg.steps,
                 mesh_dims=param_mesh_dims(cfg))
