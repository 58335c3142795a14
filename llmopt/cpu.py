"""What this CPU can do fast, read from /proc/cpuinfo without importing torch (the harness and the report
read it too). Speed choices that depend on the CPU (``llmopt.model.explicit_attention``) ask here, never a
measured figure from one machine."""
from __future__ import annotations

import functools

# x86 flags that decide how fast bf16 (and fp16) matrix products run on a CPU: with them oneDNN has native
# kernels; without them bf16 products are emulated through fp32 and run several times slower.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> tuple[str, ...]:
    """This CPU's low-precision matrix features (of NATIVE_BF16_FLAGS) from /proc/cpuinfo; () when it has none
    or the file is not there (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return tuple(f for f in NATIVE_BF16_FLAGS if f in have)
    except OSError:
        pass
    return ()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    return any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16"))


def cpu_has_native_fp16() -> bool:
    return any(f in cpu_flags() for f in ("avx512_fp16", "amx_fp16"))


def cpu_has_native(precision: str) -> bool:
    """Whether this CPU multiplies matrices of ``precision`` natively (fp32 always); without, oneDNN emulates
    them through fp32, which is slower than fp32 itself (0.08x for fp16 on an AMD EPYC with AVX512-BF16)."""
    return {"fp32": True, "bf16": cpu_has_native_bf16(), "fp16": cpu_has_native_fp16()}[precision]
