"""The pieces of a decoder block: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Attention goes through `torch.nn.functional.scaled_dot_product_attention`, so PyTorch picks
its flash or memory-efficient kernel where the device has one. Rotary embeddings use the
"rotate half" layout of Llama, so weights copy into Hugging Face's LlamaForCausalLM as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_lightning.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the autocast dtype: the mean of squares loses precision in bf16.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..n, grown on demand when a longer sequence arrives."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._build(max_seq_len)

    def _build(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.cos.shape[0]:
            self._build(max(start + length, 2 * self.cos.shape[0]))
        return self.cos[start : start + length], self.sin[start : start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by position; pairs are (i, i + head_dim/2).

    x * cos + rotate_half(x) * sin, in x's dtype (as Hugging Face does under autocast).
    """
    return _Rotary.apply(x, cos.to(x.dtype), sin.to(x.dtype))


class _Rotary(torch.autograd.Function):
    """Rotary embedding in three fused passes, saving no activation for the backward.

    The plain formula (chunk, negate, concatenate, two products, a sum) makes five
    temporaries per call and keeps x alive for the backward. A rotation's gradient is the
    rotation by the opposite angle, so the backward needs only cos and sin.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - sign x2 sin, x2 cos + sign x1 sin), halves of the last dim."""
    half = x.shape[-1] // 2
    sin = sin[..., :half]  # the table repeats its first half
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin, value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin, value=sign)
    return out


class KVCache:
    """Keys and values of past positions for incremental decoding, one slot per layer."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype) -> None:
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.length = 0  # positions filled so far
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} requested")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    """Causal grouped-query self-attention; q, k and v come from one fused projection."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        kv_dim = config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, config.hidden_size + 2 * kv_dim, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        cfg = self.config
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim], dim=-1
        )
        q = q.view(batch, seq, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(batch, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(batch, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_index, k, v)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=_causal_mask(past, seq, q.device) if past and seq > 1 else None,
            is_causal=past == 0 and seq > 1,
            dropout_p=cfg.dropout if self.training else 0.0,
            enable_gqa=cfg.kv_groups > 1,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, cfg.hidden_size))


def _causal_mask(past: int, seq: int, device) -> torch.Tensor:
    """Boolean mask for `seq` new queries after `past` cached positions (True = may attend)."""
    query_pos = torch.arange(past, past + seq, device=device)[:, None]
    key_pos = torch.arange(past + seq, device=device)[None, :]
    return key_pos <= query_pos


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one fused projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# ----------------------------------------------------------------------------- loss
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
) -> torch.Tensor:
    """Cross entropy of `hidden @ weight.T` against `targets`, never holding all the logits.

    hidden (N, H), weight (V, H), targets (N,) -> the mean loss, or the N per-row losses with
    reduction="none", in fp32. The logits are computed `chunk_rows` rows at a time (default:
    `loss_chunk_rows`), in the autocast dtype when autocast is on (as `lm_head` would), and
    reduced in fp32. When gradients are needed for the mean, each chunk's gradients are
    computed right away (the logits are in cache then) and the backward pass only scales them.
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
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
    # Per-row losses with gradients (no caller in the project needs them): the plain way.
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product of `tensor` runs in here: the autocast dtype if autocast is on."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def _chunked_losses(hidden, weight, targets, chunk_rows: int) -> torch.Tensor:
    dtype = _compute_dtype(hidden)
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

    d(mean loss)/d(logits) = (softmax(logits) - onehot(target)) / N, so each chunk's logits
    turn into their gradient in place, which then gives that chunk's share of the hidden-state
    and weight gradients. Matrix products run in the autocast dtype, softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int):
        dtype, rows = _compute_dtype(hidden), hidden.shape[0]
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
                logits = (h @ w.t()).float()
                target_logits = logits.gather(1, target)
                peak = logits.amax(dim=-1, keepdim=True)
                grad = logits.sub_(peak).exp_()  # softmax x its normaliser, in place of the logits
                normaliser = grad.sum(dim=-1, keepdim=True)
                total += (peak + normaliser.log() - target_logits).sum()  # logsumexp - target logit
                grad.div_(normaliser * rows)
                grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype).div_(rows))
                grad = grad.to(dtype)
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
        return grad_hidden, grad_weight, None, None
