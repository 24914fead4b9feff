"""Choosing the device and dtype a tool runs on (generate, bench)."""

from __future__ import annotations

import torch

from llm_lightning.errors import UserError


def resolve_device(name: str) -> torch.device:
    """cpu, cuda, cuda:N, mps or auto (cuda when there is one); UserError for one not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {name}: no CUDA device here; use --device cpu")
        if (device.index or 0) >= count:
            raise UserError(f"--device {name}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: unsupported; use cpu, cuda, cuda:N or auto")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
