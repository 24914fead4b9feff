"""What one rank holds while training: a formula, and the same quantities measured on a model.

Per rank, for P parameters, AdamW and fp32 master weights (what bf16-mixed keeps too):
- parameters 4P, gradients 4P, optimizer state 8P (two moments) under DDP; each divided by the
  data-parallel size under FSDP2 (and by the tensor-parallel size under TP);
- FSDP2 also holds, while a unit computes, its gathered parameters in the compute dtype: the
  root (embeddings, head) through the whole forward, and two blocks (one computing, one
  prefetched);
- activations saved for the backward: `activation_bytes_per_token` per layer and token of the
  micro-batch; with full activation checkpointing only each block's input is kept, plus one
  block's activations while it is recomputed.
The per-token activation count is read off the model itself (`measure_activations`: the bytes
autograd saves for one block), so the formula follows the architecture as it changes.
"""

from __future__ import annotations

import torch

from llm_lightning.model import ModelConfig, num_parameters

GiB = 2**30


def _dtype_bytes(precision: str) -> int:
    return 2 if str(precision).startswith(("bf16", "16")) else 4


def activation_bytes_per_token(config: ModelConfig, precision: str = "bf16-mixed") -> int:
    """Bytes autograd keeps per token for one block: read off a one-block model.

    The slope between 8 and 16 tokens: what grows with the tokens (autocast's low-precision
    copies of the weights, kept for the backward too, do not).
    """
    return (measure_activations(config, precision, 16) - measure_activations(config, precision, 8)) // 8


def measure_activations(config: ModelConfig, precision: str, tokens: int = 8) -> int:
    """Bytes of the tensors autograd saves in one block for `tokens` tokens (storages counted once)."""
    from llm_lightning.model import Transformer
    from llm_lightning.model.layers import RotaryEmbedding

    small = ModelConfig(**{**config.to_dict(), "num_layers": 1, "vocab_size": 8, "max_seq_len": tokens})
    with torch.device("cpu"):
        block = Transformer(small).layers[0]
    x = torch.randn(1, tokens, small.hidden_size, requires_grad=True)
    cos, sin = RotaryEmbedding(small.head_dim, tokens, small.rope_theta)(0, tokens)
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    dtype = torch.bfloat16 if _dtype_bytes(precision) == 2 else None
    hooks = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        block(x, cos, sin).sum()
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    tables = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    return sum(size for ptr, size in storages.items() if ptr not in weights | tables)


def training_memory(
    config: ModelConfig,
    *,
    strategy: str = "ddp",
    devices: int = 1,
    tensor_parallel: int = 1,
    micro_batch_size: int = 1,
    seq_len: int = 2048,
    precision: str = "bf16-mixed",
    activation_checkpointing: str = "none",
    activation_per_token: int | None = None,
) -> dict[str, float]:
    """Bytes one rank holds at its peak, by kind (see the module docstring)."""
    params = num_parameters(config)
    shards = devices if strategy in ("fsdp", "fsdp_tp", "tp") else 1
    state = {
        "parameters": 4 * params / shards,
        "gradients": 4 * params / shards,
        "optimizer": 8 * params / shards,
    }
    compute = _dtype_bytes(precision)
    if strategy in ("fsdp", "fsdp_tp"):
        block = (
            num_parameters(config, include_embedding=False) - config.vocab_size * config.hidden_size
        ) / config.num_layers
        root = 2 * config.vocab_size * config.hidden_size
        state["gathered"] = compute * (root + 2 * block) / tensor_parallel
    per_token = activation_per_token or activation_bytes_per_token(config, precision)
    tokens = micro_batch_size * seq_len
    if activation_checkpointing == "full":
        activations = config.num_layers * tokens * config.hidden_size * compute + tokens * per_token
    else:
        activations = config.num_layers * tokens * per_token
    state["activations"] = activations / tensor_parallel
    state["total"] = sum(state.values())
    return state


def held_bytes(module: torch.nn.Module, optimizer=None) -> dict[str, int]:
    """Bytes this rank holds now for parameters, gradients and optimizer state (local shards only)."""

    def local(tensor) -> int:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return tensor.numel() * tensor.element_size()

    held = {
        "parameters": sum(local(p) for p in module.parameters()),
        "gradients": sum(local(p.grad) for p in module.parameters() if p.grad is not None),
    }
    if optimizer is not None:
        held["optimizer"] = sum(
            local(value)
            for state in optimizer.state.values()
            for value in state.values()
            if torch.is_tensor(value) and value.dim()
        )
    return held
