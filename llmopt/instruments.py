"""Measurements: a device-synchronised step timer, peak memory, FLOPs and MFU."""
from __future__ import annotations

import os
import resource
import sys
import time

import torch

from llmopt.safe_files import makedirs, open_file


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so the clock reads the work's end rather than its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.times_ms: list[float] = []

    def __enter__(self):
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.times_ms.append((time.perf_counter() - self._t0) * 1e3)
        return False


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the caching allocator's peak of allocated tensor bytes. CPU: the process's peak resident set
    size (ru_maxrss), which includes the Python interpreter and libraries, not tensors alone."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def percentile(values: list[float], q: float) -> float:
    """Linearly interpolated percentile, q in [0, 100]."""
    return float(torch.tensor(values, dtype=torch.float64).quantile(q / 100))


def measured_steps(times_ms: list[float], warmup: int, starts=(0,)) -> list[float]:
    """Step times without the warm-up steps after each start (all of them when none are left): a resumed run
    (a requeued SLURM job) pays first-call costs again at the step it resumed at."""
    cold = {s + i for s in starts for i in range(warmup)}
    return [x for i, x in enumerate(times_ms) if i not in cold] or times_ms


def coefficient_of_variation(values: list[float]) -> float | None:
    """Sample standard deviation over the mean (None under two values): the spread pytest-benchmark reports
    beside each benchmark, here for a row's timed steps."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return var ** 0.5 / mean if mean > 0 else None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation (Chowdhery et al. 2022, appendix B): achieved model FLOP/s over the peak.
    The model FLOPs follow llmopt.core.shapes.flops_per_token (6N + 12·L·H·Q·T, no recomputation counted)."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops


def gradient_noise_scale(g2_small, g2_big, b_small: float, b_big: float):
    """Unbiased estimates of |G|^2 and tr(Sigma) from squared gradient norms at two batch sizes (McCandlish
    et al. 2018, "An Empirical Model of Large-Batch Training", appendix A.1):

        |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

    Batch sizes in sequences; norms as floats or 0-dim tensors (kept on the device: no host sync). The
    simple noise scale B_simple = tr(Sigma) / |G|^2 is taken from averages of each, never per step (the
    ratio of noisy estimates is biased)."""
    if not 0 < b_small < b_big:
        raise ValueError(f"gradient_noise_scale: need 0 < b_small < b_big, got {b_small}, {b_big}")
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    trace_sigma = (g2_small - g2_big) / (1 / b_small - 1 / b_big)
    return g2, trace_sigma


class NoiseScale:
    """Exponential moving averages of |G|^2 and tr(Sigma), updated each step without a host sync; read
    ``b_simple()`` at evals."""

    def __init__(self, b_small: int, b_big: int, decay: float = 0.95):
        self.b_small, self.b_big, self.decay = b_small, b_big, decay
        self.g2 = self.trace = None

    def update(self, g2_small: torch.Tensor, g2_big: torch.Tensor) -> None:
        g2, tr = gradient_noise_scale(g2_small.float(), g2_big.float(), self.b_small, self.b_big)
        if self.g2 is None:
            self.g2, self.trace = g2 * (1 - self.decay), tr * (1 - self.decay)
        else:
            self.g2.mul_(self.decay).add_(g2, alpha=1 - self.decay)
            self.trace.mul_(self.decay).add_(tr, alpha=1 - self.decay)

    def b_simple(self) -> float | None:
        """tr(Sigma) / |G|^2 in sequences (the averages' common bias cancels); None before any step or when
        the averaged |G|^2 is not positive (noise larger than the signal so far)."""
        if self.g2 is None:
            return None
        g2, tr = float(self.g2), float(self.trace)  # host sync: called at evals only
        return tr / g2 if g2 > 0 and tr > 0 else None


# MemTracker's reference kinds -> llmopt's categories (llmopt.memory.CATEGORIES, plus "other").
_MEMREF_CATEGORY = {"PARAM": "parameters", "BUFFER": "parameters", "GRAD": "gradients", "OPT": "optimizer_state",
                    "ACT": "activations", "TEMP": "activations", "OTH": "other"}


def _step_tracker():
    # Private torch API, kept on purpose: MemTracker (torch.distributed._tools) is the only tracker that splits
    # memory into parameters, gradients, optimizer state and activations, and counting a whole step needs the
    # overrides of its private _pre_fw_hook and _track_optimizer_states below. tests/test_memory.py pins them
    # (the methods and attributes they rely on exist; accumulation steps and SOAP's nested state are tracked and
    # match the prediction), so an upgrade that changes them fails there instead of measuring wrong.
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils._pytree import tree_flatten

    class StepMemTracker(MemTracker):
        """MemTracker over a whole training step. Accumulation micro-batches and pipeline chunks call the root
        module more than once per step, which MemTracker refuses (it takes a second root call for a second
        iteration). Only the global peak is read here, so the root's module-wise stats are dropped before each
        further call; the peak snapshot is untouched."""

        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                name = self._mod_tracker.get_known_fqn(module)
                if set(self._mod_tracker.parents) - {name} == {"Global"}:
                    del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

        def _track_optimizer_states(self, reftype, optimizer):
            """Every tensor of the state, nested ones too: MemTracker reads only a state's top-level tensors,
            and SOAP keeps its preconditioners in lists (unseen, they were missing from the forward's peak);
            a state that is a mapping but not a dict (``llmopt.optim.ShardState``) read as a dict."""
            for states in optimizer.state.values():
                for val in tree_flatten(dict(states))[0]:
                    if isinstance(val, torch.Tensor):
                        self._update_and_maybe_create_winfos(val, reftype)

    return StepMemTracker()


def tracked_memory_step(state, run_step) -> dict[str, int]:
    """Run one extra, untimed training step (``run_step()``) under torch's MemTracker and return the tensor
    memory by category at the step's peak, plus "total". MemTracker slows the step down, so it never runs
    inside the timed steps."""
    tracker = _step_tracker()
    tracker.track_external(state.layout.module, state.optimizer)
    with tracker:
        run_step()
    dev = state.device
    snap = next((v for k, v in tracker.get_tracker_snapshot("peak").items()
                 if k.type == dev.type and (dev.type != "cuda" or k.index == dev.index)), {})
    out = {c: 0 for c in _MEMREF_CATEGORY.values()}
    for kind, nbytes in snap.items():
        name = getattr(kind, "name", str(kind))
        if name in _MEMREF_CATEGORY:
            out[_MEMREF_CATEGORY[name]] += int(nbytes)
    out["total"] = int(snap.get("Total", sum(out.values())))
    # DistributedDataParallel allocates its gradient buckets at construction, outside the tracked step;
    # they are live memory all the same and hold every trainable parameter's gradient, so they count as
    # gradients of the parameters' own size.
    if isinstance(state.layout.model, torch.nn.parallel.DistributedDataParallel):
        buckets = sum(p.numel() * p.element_size() for p in state.layout.model.parameters() if p.requires_grad)
        out["gradients"] += buckets
        out["total"] += buckets
    return out


def check_profile_dir(path: str) -> None:
    """``--profile DIR``: refused before training if it cannot become a directory of this run's traces."""
    from llmopt.scratch import check_writable_dir

    check_writable_dir(path, "--profile", may_exist=True)


def profiled_steps(state, run_step, out_dir: str, rank: int, first_step: int, steps: int = 2) -> str:
    """Run ``steps`` extra, untimed training steps (``run_step(i)``) under torch.profiler, after one more to
    leave the profiler's own start-up out, and write this rank's Chrome trace (``rank{r}.trace.json``, for
    Perfetto or chrome://tracing) and its operator table sorted by self time (``rank{r}.ops.txt``). The
    profiler adds per-op overhead, so these steps never run inside the timed ones. Returns the table's path."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = state.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    makedirs(out_dir)
    with profile(activities=activities, record_shapes=True,
                 schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
        for i in range(first_step, first_step + 1 + steps):
            run_step(i)
            synchronize(state.device)
            prof.step()
    prof.export_chrome_trace(os.path.join(out_dir, f"rank{rank}.trace.json"))
    table = os.path.join(out_dir, f"rank{rank}.ops.txt")
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open_file(table) as f:
        f.write(f"# {steps} training steps of {state.cfg.preset} on {state.device}, rank {rank}; sorted by {sort}\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=70) + "\n")
    return table


class EnergyMeter:
    """Energy over the timed steps: NVML's total-energy counter on an NVIDIA GPU (this rank's device), else
    RAPL's package counter on CPU where readable (read by local rank 0 only: it covers the whole package).
    A background thread samples GPU utilisation and power. Every figure is None where unavailable."""

    RAPL = "/sys/class/powercap"

    def __init__(self, device: torch.device, local_rank: int):
        self.device, self._nvml, self._rapl = device, None, []
        self.samples: list[tuple[float, float]] = []
        self._start, self._stop_evt = None, None  # stop() before start() (a run that ended early) reads None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml)  # raises where unsupported
            except Exception:
                self._nvml = None
        elif local_rank == 0:
            import glob

            for path in glob.glob(f"{self.RAPL}/intel-rapl:[0-9]*/energy_uj"):
                try:
                    with open(path) as f:
                        int(f.read())
                    self._rapl.append(path)
                except (OSError, ValueError):
                    pass

    def _read_j(self) -> float | None:
        if self._nvml is not None:
            import pynvml

            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml) / 1e3  # mJ -> J
        if self._rapl:
            total = 0
            for path in self._rapl:  # counters wrap; a short window rarely sees it, a wrap reads as None
                with open(path) as f:
                    total += int(f.read())
            return total / 1e6
        return None

    def start(self) -> None:
        import threading

        self._start = self._read_j()
        self._stop_evt = threading.Event()
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        import pynvml

        while not self._stop_evt.wait(0.1):
            util = pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu
            power = pynvml.nvmlDeviceGetPowerUsage(self._nvml) / 1e3  # mW -> W
            self.samples.append((float(util), power))

    def stop(self) -> dict:
        end = self._read_j()
        if self._stop_evt is not None:
            self._stop_evt.set()
        energy = None if self._start is None or end is None or end < self._start else end - self._start
        util = [u for u, _ in self.samples]
        power = [p for _, p in self.samples]
        return {"energy_j": energy,
                "gpu_util_mean": sum(util) / len(util) if util else None,
                "gpu_power_w_mean": sum(power) / len(power) if power else None}


class Stopwatch:
    """Times one part of a step (the optimizer's update) without a host sync of its own: CUDA events on a GPU,
    read once the step's own synchronisation has passed (``ms()`` then does not wait), the clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._ms = 0.0

    def __enter__(self):
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._end.record()
        else:
            self._ms = (time.perf_counter() - self._t0) * 1e3
        return False

    def ms(self) -> float:
        return self._start.elapsed_time(self._end) if self.cuda else self._ms
