"""Timing helpers shared by `llm-lightning bench` and the benchmarks in benchmarks/.

Every benchmark times steps the same way: `time_steps` (wall seconds per call, the device
synchronised), `summarize` (tokens/s from the median step, FLOP/s, MFU against the device's
peak, peak memory) and `profile_step` (where a step's time goes).
"""

from __future__ import annotations

import contextlib
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llm_lightning.training.throughput import device_peak_flops


def autocast(device: torch.device, precision: str):
    """The autocast context a `*-mixed` precision means (what Lightning's plugin enters)."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a step's wall time is the device's time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Wall seconds of each of `steps` calls of `step`, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's max allocated, or the CPU process's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024, "process max RSS"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def summarize(
    step_times: list[float],
    tokens_per_step: int,
    flops_per_tok: int,
    device: torch.device,
    precision: str,
) -> dict:
    """Throughput, FLOP/s and MFU from the timed steps (median step time: robust to noise)."""
    median = statistics.median(step_times)
    tokens_per_s = tokens_per_step / median
    achieved = tokens_per_s * flops_per_tok
    peak = device_peak_flops(device, precision)
    memory, memory_kind = peak_memory(device)
    return {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": precision,
        "tokens_per_step": tokens_per_step,
        "step_time_s": {"median": median, "min": min(step_times), "max": max(step_times)},
        "step_times_s": step_times,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_tok,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": achieved / peak if peak else None,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
    }


def random_batches(count: int, batch: int, seq_len: int, vocab: int, device, seed: int) -> list:
    """(inputs, targets) pairs of random ids: the arithmetic does not depend on the values."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=generator)
        batches.append((ids[:, :-1].to(device), ids[:, 1:].to(device)))
    return batches


def profile_step(step: Callable[[], None], device: torch.device, top: int, steps: int = 2) -> list[dict]:
    """The `top` operators by self time over `steps` more steps: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    on_device = device.type == "cuda"
    events = [e for e in profiler.key_averages() if e.key and not e.key.startswith("ProfilerStep")]
    self_us = (lambda e: e.self_device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events) or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "self_ms_per_step": self_us(e) / 1e3 / steps,
            "share": self_us(e) / total,
            "calls": e.count,
        }
        for e in ranked
    ]
