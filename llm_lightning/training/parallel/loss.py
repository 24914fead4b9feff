"""The chunked LM-head loss with the head split by vocabulary rows over a tensor-parallel group.

`vocab_parallel_cross_entropy` replaces the model's `head_loss` under tensor parallelism
(parallelize.py installs it). Each rank holds rows [start, start + V/tp) of the head and
computes, chunk by chunk, its local logits; one all-reduce MAX of the row maxima and one
all-reduce SUM of (sum of exponentials, target logit) make every rank's loss the loss over the
whole vocabulary. As in model/loss.py, the gradients are computed in the forward pass, chunk by
chunk, and no rank ever holds more than a chunk of its local logits: the gradient of the local
head rows is exact locally, the hidden states' gradient is a partial sum per rank, all-reduced
once at the end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from llm_lightning.model.loss import compute_dtype, loss_chunk_rows


def vocab_parallel_cross_entropy(
    hidden: torch.Tensor,
    weight,
    targets: torch.Tensor,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """hidden (N, H), replicated over the group; weight: the head as a Shard(0) DTensor on the TP mesh."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: choose mean or none")
    mesh = weight.device_mesh
    local = weight.to_local()  # differentiable: its gradient comes back as a Shard(0) DTensor
    start, group = mesh.get_local_rank() * local.shape[0], mesh.get_group()
    chunk_rows = chunk_rows or loss_chunk_rows(hidden.device, local.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or local.requires_grad)
    if not needs_grad:
        with torch.no_grad():
            losses, _, _ = _pass(hidden, local, targets, group, start, chunk_rows, False, 0.0)
        return losses.mean() if reduction == "mean" else losses
    if reduction == "none":
        raise NotImplementedError("per-token losses with gradients under vocabulary parallelism")
    return _VocabParallelCrossEntropy.apply(hidden, local, targets, group, start, chunk_rows, z_loss)


def _pass(hidden, weight, targets, group, vocab_start: int, chunk_rows: int, grads: bool, z_loss: float):
    """(per-row losses, partial-then-reduced hidden gradient, local weight gradient) of the mean loss."""
    dtype, rows, local_vocab = compute_dtype(hidden), hidden.shape[0], weight.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        losses = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        for begin in range(0, rows, chunk_rows):
            end = min(rows, begin + chunk_rows)
            h = hidden[begin:end].to(dtype)
            local_target = targets[begin:end] - vocab_start
            mine = (local_target >= 0) & (local_target < local_vocab)  # this rank holds the target's row
            index = local_target.clamp(0, local_vocab - 1)[:, None]
            logits = (h @ w.t()).float()
            target_logit = logits.gather(1, index).squeeze(1) * mine
            peak = logits.amax(dim=-1)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            exp = logits.sub_(peak[:, None]).exp_()
            stats = torch.stack([exp.sum(dim=-1), target_logit])
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            normaliser, target_logit = stats[0], stats[1]
            lse = peak + normaliser.log()
            losses[begin:end] = lse - target_logit + z_loss * lse.square()
            if grads:  # d(mean loss)/d(logits) = (softmax (1 + 2 z lse) - onehot) / rows, in place
                if z_loss:
                    exp.mul_((1 + 2 * z_loss * lse)[:, None])
                grad = exp.div_(normaliser[:, None] * rows)
                grad.scatter_add_(1, index, (mine.to(grad.dtype) / -rows)[:, None])
                grad = grad.to(dtype)
                grad_hidden[begin:end] = grad @ w  # this rank's share of the vocabulary
                if dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += (grad.t() @ h).float()
        if grads:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
    return losses, grad_hidden, grad_weight


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, group, vocab_start: int, chunk_rows: int, z_loss: float):
        losses, grad_hidden, grad_weight = _pass(
            hidden, weight, targets, group, vocab_start, chunk_rows, True, z_loss
        )
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses.sum() / hidden.shape[0]

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            (grad_weight * grad_loss).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
        )
