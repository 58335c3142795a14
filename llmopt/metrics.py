"""Measurements: a device-synchronised step timer, peak memory, FLOPs and MFU."""
from __future__ import annotations

import resource
import sys
import time

import torch


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


def measured_steps(times_ms: list[float], warmup: int) -> list[float]:
    """Step times after the warm-up steps (all of them when there are no more)."""
    return times_ms[warmup:] or times_ms


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation (Chowdhery et al. 2022, appendix B): achieved model FLOP/s over the peak.
    The model FLOPs follow llmopt.model.flops_per_token (6N + 12·L·H·Q·T, no recomputation counted)."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops
