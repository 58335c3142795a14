"""The peak FLOP/s MFU is stated against, where a datasheet gives it: torch-free, read by the harness
(``bench.hardware``, which measures a CPU's instead) and by a run's TensorBoard log (``llmopt.loop.Board``)."""
from __future__ import annotations

# Dense peak FLOP/s per GPU from NVIDIA's datasheets (SXM parts). fp32 is the non-tensor-core figure:
# llmopt leaves torch's fp32 matmul precision at "highest" (no TF32).
DATASHEET = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
}


def datasheet_peak(device_name: str, precision: str) -> float | None:
    for key, table in DATASHEET.items():
        if key in device_name:
            return table[precision]
    return None
