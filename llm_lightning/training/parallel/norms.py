"""The global gradient norm, and clipping by it, over plain tensors and DTensors on any meshes.

`torch.nn.utils.clip_grad_norm_` stacks the per-tensor norms, which fails when gradients live
on different meshes (2D: norm weights on the data-parallel mesh, matrices on both) or mix plain
tensors with DTensors (tensor parallelism leaves norm weights plain). Here the squares are
summed per (mesh, placements) group, each group made whole with one all-reduce, and added as
plain tensors. On one device, or under DDP, it is the ordinary global norm.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def _grouped_grads(parameters: Iterable[torch.Tensor]) -> dict:
    groups: dict = {}
    for param in parameters:
        grad = param.grad
        if grad is not None:
            key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
            groups.setdefault(key, []).append(grad)
    return groups


def _norm(groups: dict) -> torch.Tensor:
    total = None
    for grads in groups.values():
        norms = torch._foreach_norm(grads, 2.0)
        norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the group's partial norms, all-reduced once
        total = norm**2 if total is None else total + norm.to(total.device) ** 2
    return torch.zeros(()) if total is None else total.sqrt()


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together (a plain tensor, the same on every rank)."""
    return _norm(_grouped_grads(parameters))


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients so that their global norm is at most `max_norm`; return the norm before."""
    groups = _grouped_grads(parameters)
    total = _norm(groups)
    if max_norm < float("inf"):
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in groups.values():
            torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total
