"""The global gradient norm, and clipping by it, over plain tensors and DTensors on any meshes.

`torch.nn.utils.clip_grad_norm_` stacks the per-tensor norms, which fails when gradients live
on different meshes (2D: norm weights on the data-parallel mesh, matrices on both) or mix plain
tensors with DTensors (tensor parallelism leaves norm weights plain). Here the squares are
summed per (mesh, placements) group, each group made whole with one all-reduce, and added as
plain tensors. On one device, or under DDP, it is the ordinary global norm.

The latest norm is remembered while the same gradient tensors are unchanged (weak references
and version counters): the non-finite guard asks for it before the clipping does, and the
clipping then reuses it instead of another pass over the gradients (and another all-reduce).
"""

from __future__ import annotations

import weakref
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


_memo: tuple[list, list[int], torch.Tensor] | None = None  # (weak refs to grads, their versions, norm)


def _remembered_norm(groups: dict) -> torch.Tensor:
    """`_norm(groups)`, reused while every gradient is the same tensor with the same version."""
    global _memo
    grads = [grad for group in groups.values() for grad in group]
    if _memo is not None and len(_memo[0]) == len(grads):
        refs, versions, norm = _memo
        if all(r() is g and g._version == v for r, g, v in zip(refs, grads, versions, strict=True)):
            return norm
    norm = _norm(groups)
    _memo = ([weakref.ref(g) for g in grads], [g._version for g in grads], norm)
    return norm


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together (a plain tensor, the same on every rank)."""
    return _remembered_norm(_grouped_grads(parameters))


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients so that their global norm is at most `max_norm`; return the norm before."""
    groups = _grouped_grads(parameters)
    total = _remembered_norm(groups)
    if max_norm < float("inf"):
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in groups.values():
            torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total
