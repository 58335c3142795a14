"""What the sweep ran on (env.json) and the peak FLOP/s that MFU is stated against.

Peak FLOP/s per device: the datasheet's dense (no sparsity) tensor-core figure for known NVIDIA GPUs,
else a dense matmul measured once per sweep on this device and dtype (``peak_flops_source`` says which).
On CPU the measured peak uses every core, since the ranks of one config share them.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from llmopt.core.peaks import DATASHEET, datasheet_peak  # noqa: F401 (re-exported: the advisor's probe reads them)
from llmopt.cpu import NATIVE_BF16_FLAGS, cpu_flags, cpu_model  # noqa: F401 (re-exported for the report)
from llmopt.safe_files import makedirs, write_json

if TYPE_CHECKING:
    from llmopt.core.config import TrainConfig
    from llmopt.core.run_metrics import RunMetrics

# On CPU the token dimension of the measured GEMMs stops here: a larger M adds time, not FLOP/s.
CPU_GEMM_TOKENS = 2048


def gemm_shapes(n_embd: int, vocab_size: int, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matrix product a step runs on a block and the head: the forward x @ W and the
    backward's grad-input (dY @ W^T) and grad-weight (X^T @ dY) products, for qkv, the attention
    projection, both MLP layers and the output head."""
    C = n_embd
    shapes = []
    for k, n in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C), (C, vocab_size)):
        shapes += [(tokens, k, n), (tokens, n, k), (k, tokens, n)]
    return sorted(set(shapes))


# How long the matmul peak is timed per dtype (seconds, over all its shapes; each shape also gets one warm-up
# product). More gives a steadier peak; the test suite sets 0.1 (conftest.py): its sweeps check MFU's
# bounds, not its value, and a second per sweep and dtype was about a minute of the suite.
PEAK_SECONDS_ENV = "LLMOPT_PEAK_SECONDS"


def peak_seconds() -> float:
    """LLMOPT_PEAK_SECONDS (default 1); a bad value raises ValueError with the fix (bench.run says it in one
    line before any work)."""
    text = os.environ.get(PEAK_SECONDS_ENV, "1")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ValueError(f"{PEAK_SECONDS_ENV}={text!r}: use a positive number of seconds (default 1)")
    return value


def measure_matmul_peak(device: str, precision: str, shapes: list[tuple[int, int, int]] = (),
                        seconds: float = 1.0, threads: int | None = None) -> float:
    """Best FLOP/s over square matmuls and the given (m, k, n) shapes (the model's own GEMMs), after a
    warm-up, with the device synchronised. Taking the best over the shapes the step really runs is what
    makes the figure an upper bound for the step: a square-only peak can sit below the step's own GEMMs
    (a CPU whose kernels for a dtype are tuned for some shapes and fall back for others). ``threads``: torch's
    CPU threads for it (default: as they are)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    squares = (4096, 8192) if device == "cuda" else (256, 512, 1024, 2048)
    all_shapes = [(n, n, n) for n in squares] + list(shapes)
    best = 0.0
    for m, k, n in all_shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        reps, t0 = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - t0 < seconds / len(all_shapes):
            a @ b
            reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def peak_flops(device: str, precision: str, cache: dict, n_embd: int, vocab_size: int,
               tokens: int, threads: int | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for this dtype, source). ``cache`` holds measurements of this sweep,
    keyed by device, dtype and GEMM shape set.

    On GPUs in the datasheet table, the datasheet's dense figure. Elsewhere a measurement over square
    sizes and the model's own GEMMs (``gemm_shapes``); for bf16/fp16 the peak is the best of that dtype
    and fp32, because under autocast a product the dtype runs slowly on this CPU is no faster than fp32
    can do, and some ops stay in fp32: the step can reach either, so MFU stays at or under 100%."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        value = datasheet_peak(name, precision)
        if value is not None:
            return value, f"datasheet:{name}"
    emulated = False
    if device == "cpu":
        from llmopt.cpu import cpu_has_native

        tokens = min(tokens, CPU_GEMM_TOKENS)
        # a dtype this CPU emulates through fp32 cannot beat fp32, and measuring it took minutes (fp16 on an
        # AMD EPYC: 95 of the default sweep's 126 s): its peak is fp32's
        emulated = not cpu_has_native(precision)
    shapes = gemm_shapes(n_embd, vocab_size, tokens)
    best = 0.0
    for dtype in dict.fromkeys(("fp32",) if emulated else (precision, "fp32")):
        key = f"{device}:{dtype}:C{n_embd}:V{vocab_size}:M{tokens}"
        if key not in cache:
            cache[key] = measure_matmul_peak(device, dtype, shapes, peak_seconds(), threads)
        best = max(best, cache[key])
    dtypes = (precision if precision == "fp32" else f"fp32 ({precision} is emulated through fp32 on this CPU)"
              if emulated else f"best of {precision} and fp32")
    return best, f"measured:{device} matmul, {dtypes}, square and model GEMMs"


def row_peak(tc: TrainConfig, metrics: RunMetrics | None, cache: dict, measure: bool = True,
             threads: int | None = None) -> tuple[float, str] | None:
    """The peak FLOP/s a config's MFU is stated against (measured on first use, kept in ``cache``); from the
    finished config's resolved fields, or before it runs (``metrics`` None) from its own. A GPU's datasheet
    figure is looked up by the name the config's rank saw; ``measure`` False (the config ran elsewhere: on
    SLURM the job measures its node itself, ``bench.executors.job.ConfigJob``) gives None rather than a
    measurement of this machine. ``threads``: torch's CPU threads for a measurement (``measure_matmul_peak``)."""
    if metrics is not None and metrics.flops_per_token is None:
        return None
    resolved = metrics.config if metrics is not None else {"device": tc.device,
                                                           "pp_microbatches": tc.pp_microbatches or tc.pp}
    if resolved["device"] == "cuda" and metrics is not None:
        value = datasheet_peak(metrics.device_name or "", tc.precision)
        if value is not None:
            return value, f"datasheet:{metrics.device_name}"
    if not measure:
        return None
    mc = tc.model_config
    value, source = peak_flops(resolved["device"], tc.precision, cache, mc.n_embd, mc.vocab_size,
                               tc.micro_batch * tc.seq_len // resolved["pp_microbatches"], threads)
    return (value, source) if value else None


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(argv: list[str]) -> dict:
    import torch

    env = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench.run", *argv]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "cpu_model": cpu_model(),
        "cpu_flags": list(cpu_flags()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git_commit": _git_commit(),
    }
    for pkg in ("transformers", "accelerate", "pandas", "seaborn"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception:
            env[pkg] = None
    return env


def measure_node_peak(cfg: TrainConfig, metrics: RunMetrics, metrics_path: str, cache_path: str) -> None:
    """In a SLURM job, after its config (``bench.executors.job``): this node's peak FLOP/s for the config
    (``row_peak``, as a local sweep takes it, from the config's ``metrics``), written beside them; measurements
    kept per node in ``cache_path`` for the sweep's later jobs."""
    makedirs(os.path.dirname(cache_path))
    try:
        with open(cache_path) as f:
            cache = dict(json.load(f))
    except (OSError, ValueError, TypeError):
        cache = {}
    # measured (torch imported) only on the node's first use; every core the job has, as the config's ranks had
    peak = row_peak(cfg, metrics, cache, threads=len(os.sched_getaffinity(0)))
    write_json(cache_path, cache)
    if peak is not None:
        value, source = peak
        if source.startswith("measured:"):
            source += f" on node {socket.gethostname()}"
        write_json(metrics_path + ".peak", [value, source])
