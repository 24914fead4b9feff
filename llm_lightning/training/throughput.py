"""Peak FLOP/s of the device, for model FLOPs utilisation (MFU).

GPUs: a table of dense peaks by dtype (vendor datasheets, dense, no sparsity). CPUs have no
datasheet figure worth trusting, so their peak is measured: the best of a few large matrix
products in the training dtype, the ceiling a transformer step could reach here.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

import torch

# Dense peak FLOP/s: (bf16/fp16 tensor cores, tf32, fp32). Matched by substring of the CUDA name.
GPU_PEAKS: dict[str, tuple[float, float, float]] = {
    "H200": (989e12, 494.7e12, 66.9e12),
    "H100 PCIe": (756e12, 378e12, 51.2e12),
    "H100": (989e12, 494.7e12, 66.9e12),
    "A100": (312e12, 156e12, 19.5e12),
    "A10G": (125e12, 62.5e12, 31.2e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "L4": (121e12, 60e12, 30.3e12),
    "RTX 4090": (165e12, 82.6e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12, 35.6e12),
    "V100": (125e12, 15.7e12, 15.7e12),
}


def precision_dtype(precision: str | int | None) -> torch.dtype:
    text = str(precision)
    if "bf16" in text:
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float32


def gpu_peak_flops(name: str, dtype: torch.dtype) -> float | None:
    for key, (half, tf32, fp32) in GPU_PEAKS.items():
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def cpu_has_fast_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 matrix products run 2-3x faster than fp32 on such CPUs."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@cache
def cpu_peak_flops(dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Best FLOP/s of a square matrix product on this CPU, in `dtype`.

    The best of repeated tries over about `seconds` (at least 5): on a shared machine most
    tries can be slowed by other work, the fastest is the one closest to the hardware. The
    size is fixed by the dtype, never by a timing (one slow probe on a busy machine must not
    change what is measured): 1024 x 1024, or 256 x 256 for bf16/fp16 on a CPU without native
    support (emulated, ~100x slower).
    """
    emulated = dtype in (torch.bfloat16, torch.float16) and not cpu_has_fast_bf16()
    size = 256 if emulated else 1024
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: thread pool and kernel selection
    best, tries, deadline = float("inf"), 0, time.perf_counter() + seconds
    while tries < 5 or (time.perf_counter() < deadline and tries < 100):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
        tries += 1
    return 2 * size**3 / best


def device_peak_flops(device: torch.device, precision: str | int | None) -> float | None:
    """Peak FLOP/s of one device at this precision; None when unknown."""
    dtype = precision_dtype(precision)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    if device.type == "cpu":
        return cpu_peak_flops(dtype)
    return None
