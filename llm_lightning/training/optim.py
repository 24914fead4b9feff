"""AdamW with weight decay on matrices only, and a warmup + cosine schedule per optimizer step."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and embeddings; leave norm gains (1-D) alone."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at an optimizer step: linear up, cosine down."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, device: torch.device):
    # The fused kernel is one launch for all parameters on CUDA; the foreach path elsewhere.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay), lr=lr, betas=tuple(betas), fused=fused, foreach=not fused
    )
