"""The LM-head loss: cross entropy of `hidden @ weight.T`, computed chunk by chunk.

The (tokens x vocab) logits of a batch and their gradient are the largest tensors of a
training step (64 MiB at the tiny preset's batch, gigabytes at real vocabularies); here they
are never held at once, and on a CPU each chunk stays in cache.

A chunk's softmax and gradient are about eight elementwise passes over fp32 logits, more
memory traffic than the LM head's own matrix products. With `compile=True` (what
`--model.compile` sets) a chunk's work on CUDA goes through torch.compile, which fuses them
into a reduction and one write of the bf16 gradient; on a CPU it runs eagerly, the same
arithmetic in the same order as the plain formula's tests check.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

# fp32 logits computed at a time. On a CPU, 8 MiB stays in cache (256 rows at vocab 8192,
# measured best of 128-1024), where a tiny-preset batch's 64 MiB and their gradient would not,
# and would page-fault fresh memory every step. A GPU has no such cache to fit; there the
# chunks only bound memory and are made large enough to keep the matrix products efficient.
LOSS_CHUNK_BYTES = {"cpu": 8 * 2**20}
LOSS_CHUNK_BYTES_DEFAULT = 512 * 2**20


def loss_chunk_rows(device: torch.device, vocab_size: int) -> int:
    budget = LOSS_CHUNK_BYTES.get(device.type, LOSS_CHUNK_BYTES_DEFAULT)
    return max(1, budget // (4 * vocab_size))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    z_loss: float = 0.0,
    compile: bool = False,
) -> torch.Tensor:
    """Cross entropy of `hidden @ weight.T` against `targets`, never holding all the logits.

    hidden (N, H), weight (V, H), targets (N,) -> the mean loss, or the N per-row losses with
    reduction="none", in fp32. `z_loss` > 0 adds z_loss x logsumexp(logits)^2 per row to the
    mean (PaLM's z-loss: it keeps the softmax normaliser near 1, so the logits cannot drift);
    the per-row losses (validation) are the plain cross entropy. The logits are computed `chunk_rows` rows at a time (default:
    `loss_chunk_rows`), in the autocast dtype when autocast is on (as `lm_head` would), and
    reduced in fp32. When gradients are needed for the mean, each chunk's gradients are
    computed right away (the logits are in cache then) and the backward pass only scales them.
    `compile`: run each chunk's softmax and gradient compiled when on CUDA (module docstring).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: choose mean or none")
    chunk_rows = chunk_rows or loss_chunk_rows(hidden.device, weight.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        with torch.no_grad():
            losses = _chunked_losses(hidden, weight, targets, chunk_rows)
        return losses.mean() if reduction == "mean" else losses
    if reduction == "mean":
        compiled = compile and hidden.is_cuda
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, z_loss, compiled)
    # Per-row losses with gradients (no caller in the project needs them): the plain way.
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product of `tensor` runs in here: the autocast dtype if autocast is on."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def _chunked_losses(hidden, weight, targets, chunk_rows: int) -> torch.Tensor:
    dtype = compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        losses = []
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = (hidden[start : start + chunk_rows].to(dtype) @ w.t()).float()
            target = targets[start : start + chunk_rows, None]
            losses.append(torch.logsumexp(logits, dim=-1) - logits.gather(1, target).squeeze(1))
    return torch.cat(losses)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy with gradients computed chunk by chunk in the forward pass.

    d(mean loss)/d(logits) = (softmax(logits) (1 + 2 z lse) - onehot(target)) / N, with z the
    z-loss coefficient and lse the row's logsumexp, so each chunk's logits turn into their
    gradient in place, which then gives that chunk's share of the hidden-state and weight
    gradients. Matrix products run in the autocast dtype, softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, z_loss: float = 0.0, compiled: bool = False):
        dtype, rows = compute_dtype(hidden), hidden.shape[0]
        chunk_work = compiled_chunk_loss_and_grad() if compiled else chunk_loss_and_grad
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = None
            if ctx.needs_input_grad[1]:
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, rows, chunk_rows):
                h = hidden[start : start + chunk_rows].to(dtype)
                target = targets[start : start + chunk_rows, None]
                cross_entropy, z_term, grad = chunk_work(h, w, target, rows, z_loss)
                total += cross_entropy
                if z_loss:
                    total += z_term
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_rows] = grad @ w
                if grad_weight is not None:
                    if dtype == torch.float32:
                        grad_weight.addmm_(grad.t(), h)
                    else:
                        grad_weight += (grad.t() @ h).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / rows

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunk_loss_and_grad(h, w, target, rows: int, z_loss: float):
    """One chunk: (its summed cross entropy, its summed z-loss term, d(mean loss)/d(logits)).

    The logits' gradient is in h's dtype; the reductions are fp32. In place on the logits, so
    eagerly on a CPU one chunk-sized buffer serves the logits, the softmax and the gradient.
    """
    logits = (h @ w.t()).float()
    target_logits = logits.gather(1, target)
    peak = logits.amax(dim=-1, keepdim=True)
    grad = logits.sub_(peak).exp_()  # softmax x its normaliser, in place of the logits
    normaliser = grad.sum(dim=-1, keepdim=True)
    lse = peak + normaliser.log()
    cross_entropy = (lse - target_logits).sum()  # logsumexp - target logit
    z_term = None
    if z_loss:
        z_term = z_loss * lse.square().sum()
        grad.mul_(1 + 2 * z_loss * lse)
    grad.div_(normaliser * rows)
    grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype).div_(rows))
    return cross_entropy, z_term, grad.to(h.dtype)


@cache
def compiled_chunk_loss_and_grad():
    """`chunk_loss_and_grad` through torch.compile, built on first use (importing dynamo is slow).

    dynamic=False: a run has two chunk shapes (full and last), each compiled once, and fixed
    shapes give the fastest kernels.
    """
    return torch.compile(chunk_loss_and_grad, fullgraph=True, dynamic=False)
