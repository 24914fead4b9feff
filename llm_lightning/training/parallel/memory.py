"""What one rank holds while training: a formula, and the same quantities measured on a model.

Per rank, for P parameters, fp32 master weights (what bf16-mixed keeps too):
- parameters 4P, gradients 4P under DDP (or one device); divided by the data-parallel size
  under FSDP2 (and by the tensor-parallel size under TP). FSDP2 accumulating gradients over
  micro-batches keeps them unsharded until the last one (no reduce-scatter before): 4P more;
- optimizer state: AdamW's two fp32 moments, 8 bytes per parameter; with Muon the blocks' weight
  matrices have one momentum (4 bytes) and the rest (embedding, head, norms) AdamW's two;
- the compute-dtype copies of the weights under mixed precision on one device or DDP: autocast
  casts each matrix (blocks and LM head) to bf16 for its product and autograd keeps the copy for
  the backward, 2 bytes per matrix parameter. FSDP2 instead gathers its units in the compute
  dtype: the embedding and the head with the final norm (held from the loss into the
  backward), and two blocks (one computing, one prefetched);
- the loss (model/loss.py): the fp32 head gradient and the hidden states' gradient it computes
  in the forward and keeps for the backward, and one chunk of fp32 logits with its gradient;
- activations saved for the backward: `activation_bytes_per_token` per layer and token of the
  micro-batch; with full activation checkpointing only each block's input is kept (the residual
  stream, in the compute dtype), plus one block's activations while it is recomputed.
The per-token activation count is read off the model itself (`measure_activations`: the bytes
autograd saves for one block), so the formula follows the architecture as it changes. What it
leaves out: the CUDA context and allocator fragmentation (several hundred MB on a GPU).
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
    with torch.device("meta"):  # no initialisation: the bytes saved do not depend on the values
        block = Transformer(small).layers[0]
    block.to_empty(device="cpu")
    for param in block.parameters():
        param.data.fill_(0.01)
    dtype = torch.bfloat16 if _dtype_bytes(precision) == 2 else None
    # The block's input is the residual stream, in the compute dtype (Transformer.hidden_states).
    x = torch.randn(1, tokens, small.hidden_size, dtype=dtype or torch.float32, requires_grad=True)
    cos, sin = RotaryEmbedding(small.head_dim, tokens, small.rope_theta)(0, tokens)
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        block(x, cos, sin).sum()
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    tables = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    return sum(size for ptr, size in storages.items() if ptr not in weights | tables)


def matrix_parameters(config: ModelConfig) -> int:
    """Parameters of the blocks' weight matrices (Muon's share; norm gains excluded)."""
    h = config.hidden_size
    gains = (2 * h + (2 * config.head_dim if config.qk_norm else 0)) * config.num_layers + h
    return num_parameters(config, include_embedding=False) - gains - head_parameters(config)


def head_parameters(config: ModelConfig) -> int:
    return config.vocab_size * config.hidden_size


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
    optimizer: str = "adamw",
    accumulation: int = 1,
    device: str = "cuda",
) -> dict[str, float]:
    """Bytes one rank holds at its peak, by kind (see the module docstring)."""
    params, matrices, head = num_parameters(config), matrix_parameters(config), head_parameters(config)
    fsdp = strategy in ("fsdp", "fsdp_tp")
    shards = devices if strategy in ("fsdp", "fsdp_tp", "tp") else 1
    moments = 4 * matrices + 8 * (params - matrices) if optimizer == "muon" else 8 * params
    state = {
        "parameters": 4 * params / shards,
        "gradients": 4 * params / shards + (4 * params if fsdp and accumulation > 1 else 0),
        "optimizer": moments / shards,
    }
    compute = _dtype_bytes(precision)
    if fsdp:
        block = matrices / config.num_layers
        root = 2 * config.vocab_size * config.hidden_size
        state["gathered"] = compute * (root + 2 * block) / tensor_parallel
    elif compute == 2:
        state["weight_copies"] = 2 * (matrices + head) / tensor_parallel
    tokens = micro_batch_size * seq_len
    state["loss"] = loss_bytes(config, tokens, compute, device) / tensor_parallel
    per_token = activation_per_token or activation_bytes_per_token(config, precision)
    if activation_checkpointing == "full":
        activations = config.num_layers * tokens * config.hidden_size * compute + tokens * per_token
    else:
        activations = config.num_layers * tokens * per_token
    state["activations"] = activations / tensor_parallel
    state["total"] = sum(state.values())
    return state


def loss_bytes(config: ModelConfig, tokens: int, compute: int, device: str = "cuda") -> int:
    """The chunked loss's peak: fp32 head gradient, hidden-state gradient, one chunk of logits."""
    from llm_lightning.model.loss import LOSS_CHUNK_BYTES, LOSS_CHUNK_BYTES_DEFAULT

    vocab, hidden = config.vocab_size, config.hidden_size
    rows = min(tokens, max(1, LOSS_CHUNK_BYTES.get(device, LOSS_CHUNK_BYTES_DEFAULT) // (4 * vocab)))
    chunk = rows * vocab * (4 + compute)  # fp32 logits, their gradient in the compute dtype
    return 4 * vocab * hidden + tokens * hidden * compute + chunk


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
