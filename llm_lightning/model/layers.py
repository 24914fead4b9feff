"""The pieces of a decoder block: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Attention goes through `torch.nn.functional.scaled_dot_product_attention`, so PyTorch picks
its flash or memory-efficient kernel where the device has one; on Hopper GPUs cuDNN's kernel
goes first (`attention_kernels`). Rotary embeddings use the
"rotate half" layout of Llama, so weights copy into Hugging Face's LlamaForCausalLM as they are.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from llm_lightning.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the autocast dtype: the mean of squares loses precision in bf16.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        # The gain in x's dtype: the output keeps the input's (an fp32 gain would turn a bf16
        # stream, or q/k after QK-norm, into fp32, as it does on one device but not under FSDP2).
        return normed.type_as(x) * self.weight.type_as(x)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..n, grown on demand when a longer sequence arrives."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.head_dim, self.theta, self.max_seq_len = head_dim, theta, max_seq_len
        self._build(max_seq_len)

    def reset_parameters(self) -> None:
        """Recompute the tables where the buffers now live (after `to_empty`, they hold garbage)."""
        device = self.inv_freq.device
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        self.inv_freq = 1.0 / (self.theta ** (steps / self.head_dim))
        self._build(self.max_seq_len)

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


# SDPA kernels in the order tried when cuDNN goes first: on Hopper its kernel is reported
# 1.7-2.3x faster than flash-2 for training shapes (PyTorch tries flash first); the others stay
# as fallbacks for inputs cuDNN refuses, and on CPUs, which have neither.
CUDNN_FIRST = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
ATTENTION_PRIORITIES = ("auto", "cudnn", "default")
# auto: cuDNN first on Hopper GPUs; cudnn: cuDNN first on any device (CPUs then run their own
# kernels, through the same code); default: PyTorch's order. A setting of the process, read
# when attention runs, so a benchmark can compare them.
attention_priority = "auto"
_CAN_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch >= 2.6


def attention_kernels(x: torch.Tensor):
    """The context attention runs in: cuDNN's kernel first where `attention_priority` says so.

    Entered in eager code only: around the blocks by the Transformer (a compiled block is traced
    inside it and keeps the kernel chosen then), and by each attention call, so that activation
    checkpointing's eager recomputation picks the same kernel as the forward. Inside a traced
    region it is a no-op: tracing never depends on how a torch version handles the context.
    """
    if attention_priority == "default" or not _CAN_SET_PRIORITY or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if attention_priority == "auto" and not (x.is_cuda and _is_hopper(x.device)):
        return contextlib.nullcontext()
    return sdpa_kernel(CUDNN_FIRST, set_priority=True)


def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


class Attention(nn.Module):
    """Causal grouped-query self-attention; q, k and v come from one fused projection.

    The fused weight is laid out by key/value group: for each group, the rows of its query
    heads, then its key head, then its value head (`fuse_qkv`). Splitting the rows evenly (as
    tensor parallelism does) then hands every part whole groups, and forward reads head counts
    from the tensors, not the config, so it runs unchanged on such a part.
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        kv_dim = config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, config.hidden_size + 2 * kv_dim, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.rotary = apply_rotary  # an attribute, so a benchmark can time another implementation

    def forward(self, x, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        cfg = self.config
        batch, seq, _ = x.shape
        groups = self.qkv_proj(x).view(batch, seq, -1, cfg.kv_groups + 2, cfg.head_dim)
        q = groups[:, :, :, : cfg.kv_groups].flatten(2, 3).transpose(1, 2)  # (batch, heads, seq, dim)
        k = groups[:, :, :, -2].transpose(1, 2)
        v = groups[:, :, :, -1].transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_index, k, v)
        with attention_kernels(q):
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=_causal_mask(past, seq, q.device) if past and seq > 1 else None,
                is_causal=past == 0 and seq > 1,
                dropout_p=cfg.dropout if self.training else 0.0,
                enable_gqa=cfg.kv_groups > 1,
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """The fused qkv_proj weight from plain (Llama-layout) q, k and v weights: grouped by kv head."""
    d, hidden = config.head_dim, q.shape[-1]
    q = q.reshape(config.num_kv_heads, config.kv_groups, d, hidden)
    k = k.reshape(config.num_kv_heads, 1, d, hidden)
    v = v.reshape(config.num_kv_heads, 1, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(weight: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain q, k and v weights (Llama layout) from a fused qkv_proj weight; `fuse_qkv` undone."""
    groups = weight.reshape(config.num_kv_heads, config.kv_groups + 2, config.head_dim, weight.shape[-1])
    q = groups[:, : config.kv_groups].reshape(-1, weight.shape[-1])
    return q, groups[:, -2].reshape(-1, weight.shape[-1]), groups[:, -1].reshape(-1, weight.shape[-1])


def qkv_parts(config: ModelConfig) -> tuple[list[int], int]:
    """The fused qkv weight's rows as (part sizes, blocks): `blocks` repeats of [q, k, v] rows."""
    return [config.kv_groups * config.head_dim, config.head_dim, config.head_dim], config.num_kv_heads


def _causal_mask(past: int, seq: int, device) -> torch.Tensor:
    """Boolean mask for `seq` new queries after `past` cached positions (True = may attend)."""
    query_pos = torch.arange(past, past + seq, device=device)[:, None]
    key_pos = torch.arange(past + seq, device=device)[None, :]
    return key_pos <= query_pos


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up share one fused projection.

    The fused rows alternate gate and up (`fuse_gate_up`), so an even split of the rows gives
    every part matching halves of gate and up.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).unflatten(-1, (-1, 2)).unbind(-1)
        return self.down_proj(F.silu(gate) * up)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The fused gate_up_proj weight from plain gate and up weights: rows interleaved."""
    return torch.stack([gate, up], dim=1).flatten(0, 1)


def gate_up_parts(config: ModelConfig) -> tuple[list[int], int]:
    """The fused gate/up weight's rows as (part sizes, blocks): intermediate_size repeats of [gate, up]."""
    return [1, 1], config.intermediate_size


def split_gate_up(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain gate and up weights from a fused gate_up_proj weight; `fuse_gate_up` undone."""
    return weight[0::2], weight[1::2]
