"""parallelize(): how a Transformer is spread over devices, applied from outside the model.

Called once from `LanguageModel.configure_model`, in torchtitan's order:

1. tensor parallelism (the mesh's "tensor_parallel" dimension, when larger than 1): in each
   block, the fused qkv and gate/up projections are split by output rows (`ColwiseParallel`:
   their layouts give every rank whole key/value groups and matching gate/up halves), the
   output projections by input columns (`RowwiseParallel`: their outputs are all-reduced, so
   the residual stream stays a plain tensor, the same on every rank of the group; norm weights
   stay plain and get the same gradients everywhere). The embedding and the LM head are split
   by vocabulary rows, and the model's `head_loss` becomes the vocabulary-parallel chunked
   loss (loss.py): the full logits are still never held.
2. activation checkpointing, per block: "full" recomputes a block's activations in backward,
   "selective" keeps the outputs of the matrix products and attention and recomputes the rest.
3. torch.compile, per block (fullgraph), in place (state-dict keys stay clean, Lightning #17415);
   and the chunked loss's per-chunk work, on CUDA (loss.py).
4. FSDP2 (`fully_shard`) over the "data_parallel" dimension: the embedding, each block, and the
   final norm with the LM head are units (`apply_fsdp`), then the root. On a 1-device mesh too, so that one
   process reads and writes the same sharded checkpoints as many. Its mixed-precision policy
   follows `--trainer.precision`: bf16 (or fp16) compute and gathers, fp32 reductions and
   master weights.

Without a mesh (one device, DDP) only steps 2 and 3 apply.

The model arrives on the meta device (`LanguageModel` builds it there), so no rank ever holds
the whole model: `materialize` then gives each rank storage for its shards only and writes
into them the values one process would have initialised (`Transformer.init_weights`).
Gradient accumulation under FSDP2: `set_gradient_sync` turns the reduce-scatters off on
non-final micro-batches.
"""

from __future__ import annotations

import logging
from functools import partial
from itertools import pairwise

import torch
from torch import nn

from llm_lightning.errors import UserError
from llm_lightning.model import Transformer
from llm_lightning.model.loss import linear_cross_entropy
from llm_lightning.model.transformer import INIT_BLOCK_ROWS
from llm_lightning.training.parallel.loss import vocab_parallel_cross_entropy

log = logging.getLogger(__name__)

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def parallelize(
    model: Transformer,
    mesh=None,
    activation_checkpointing: str = "none",
    compile: bool = False,
    precision: str = "32-true",
) -> Transformer:
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise UserError(
            f"--model.activation_checkpointing {activation_checkpointing!r}: choose one of "
            f"{', '.join(ACTIVATION_CHECKPOINTING)}"
        )
    tensor_parallel = mesh is not None and mesh["tensor_parallel"].size() > 1
    if tensor_parallel:
        apply_tensor_parallel(model, mesh["tensor_parallel"])
    if activation_checkpointing != "none":
        apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        if tensor_parallel and mesh.device_type == "cpu":  # (the model may still be on meta here)
            # torch 2.13 on CPU fails in backward on DTensor inputs to compiled blocks.
            log.warning("--model.compile is off under tensor parallelism on CPU (fails in torch 2.13)")
        else:
            for block in model.layers:
                # fullgraph: a graph break inside a block would split it into slower pieces unseen.
                block.compile(fullgraph=True)
            if model.head_loss is linear_cross_entropy:  # (tensor parallelism has its own loss)
                # The loss compiles its per-chunk work where it runs on CUDA; CPUs stay eager.
                model.head_loss = partial(linear_cross_entropy, compile=True)
    if mesh is not None:
        apply_fsdp(model, mesh["data_parallel"], mixed_precision_policy(precision))
    return model


def check_tensor_parallel_size(config, size: int) -> None:
    """Whole key/value groups, gate/up pairs and vocabulary rows per rank, or one clear line."""
    for name, value in (("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads)):
        if value % size:
            raise UserError(
                f"--model.{name} {value} is not divisible by the tensor-parallel size {size}: each rank needs "
                f"whole heads; change --model.num_heads/--model.num_kv_heads or the strategy's tensor_parallel_size"
            )
    for name, value in (("intermediate_size", config.intermediate_size), ("vocab_size", config.vocab_size)):
        if value % size:
            raise UserError(
                f"model {name}={value} is not divisible by the tensor-parallel size {size}; "
                f"choose sizes that are (e.g. --model.intermediate_size, or --vocab_size when preparing)"
            )


def apply_tensor_parallel(model: Transformer, tp_mesh) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_tensor_parallel_size(model.config, tp_mesh.size())
    plan = {
        "attn.qkv_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "mlp.gate_up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)
    tied = model.lm_head.weight is model.embed_tokens.weight
    parallelize_module(
        model,
        tp_mesh,
        {
            "embed_tokens": RowwiseParallel(input_layouts=Replicate()),  # masked local lookup, all-reduced
            "lm_head": ColwiseParallel(output_layouts=Replicate()),  # logits (generation) gathered back
        },
    )
    if tied:  # parallelize_module made two parameters of the shared one
        model.lm_head.weight = model.embed_tokens.weight
    model.head_loss = vocab_parallel_cross_entropy


def _selective_policy():
    """Keep what is expensive to recompute (matrix products, attention, collectives)."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,  # cuDNN goes first on Hopper (layers.py)
        torch.ops._c10d_functional.reduce_scatter_tensor.default,
        torch.ops._c10d_functional.all_reduce.default,
    }

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    options = {"preserve_rng_state": False}  # dropout is 0 in pretraining; with it, masks would differ
    if mode == "selective":
        options["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy())
    for index, block in enumerate(model.layers):
        # State-dict keys stay the same: the wrapper strips its prefix on save and adds it on load.
        model.layers[index] = checkpoint_wrapper(block, **options)


def mixed_precision_policy(precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    text = str(precision)
    if text.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if text.startswith("16"):
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return None


def apply_fsdp(model: Transformer, dp_mesh, policy) -> None:
    """Units as torchtitan's: the embedding, each block, the final norm with the LM head, then the root.

    Each unit gathers and reduce-scatters its parameters on its own, so the embedding's (a large
    share of a small model) are gathered only around the embedding and the head's only at the end.
    The head is read by the loss without being called: grouped with the final norm (called just
    before) and not resharded after forward, it stays gathered for the loss and its backward.
    Tied weights are one parameter and must share a unit: embedding, norm and head together then.
    """
    from torch.distributed.fsdp import fully_shard

    options = {"mesh": dp_mesh} if policy is None else {"mesh": dp_mesh, "mp_policy": policy}
    tied = model.lm_head.weight is model.embed_tokens.weight
    if not tied:
        fully_shard(model.embed_tokens, **options)
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by the backward: keep them gathered.
        fully_shard(block, reshard_after_forward=index < last, **options)
    head = [model.embed_tokens, model.norm, model.lm_head] if tied else [model.norm, model.lm_head]
    fully_shard(head, reshard_after_forward=False, **options)
    fully_shard(model, **options)


def fsdp_units(model: nn.Module) -> int:
    """FSDP2 units that own parameters (each reduce-scatters its gradients once per sync)."""
    from torch.distributed.fsdp import FSDPModule

    # A unit of several modules (norm + head) is one state shared by each of them: count it once.
    states = {
        id(m._get_fsdp_state()): m._get_fsdp_state() for m in model.modules() if isinstance(m, FSDPModule)
    }
    return sum(1 for state in states.values() if state._fsdp_param_group is not None)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2: reduce-scatter gradients in this backward or not (keep accumulating them unsharded).

    Lightning's no-sync during gradient accumulation covers DDP only; without this FSDP2
    reduce-scatters every unit's gradients after every micro-batch.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


@torch.no_grad()
def materialize(model: Transformer, device: torch.device) -> None:
    """Storage for a model built on the meta device, then one process's initial weights, shard by shard."""
    model.to_empty(device=device)
    model.init_weights(write=write_local_shard)


def write_local_shard(param: torch.Tensor, value) -> None:
    """Store this rank's part of a parameter's initial value; `value(rows)` draws rows of it."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if not isinstance(param, DTensor):
        param.copy_(value())
    elif param.device_mesh.ndim == 1 and param.placements == (Shard(0),):
        # FSDP2's rows (torch.chunk's split): draw only those, so that no rank ever holds a whole
        # parameter (at xl that decides a rank's peak memory during init).
        mesh, local = param.device_mesh, param.to_local()
        per_rank = -(-param.shape[0] // mesh.size())
        start = mesh.get_local_rank() * per_rank
        stop = start + local.shape[0]  # (a rank past the last chunk holds nothing)
        # Block by block, aligned to the generators' blocks: each is drawn once, straight into place.
        edges = sorted(
            {start, stop, *range(-(-start // INIT_BLOCK_ROWS) * INIT_BLOCK_ROWS, stop, INIT_BLOCK_ROWS)}
        )
        for low, high in pairwise(edges):
            local[low - start : high - start].copy_(value(slice(low, high)))
    else:
        # src_data_rank=None: every rank holds the whole value and slices its part, no communication.
        shard = distribute_tensor(value(), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())


def plain_module(module: nn.Module) -> nn.Module:
    """A block without its activation-checkpointing wrapper (for code that inspects blocks)."""
    return getattr(module, "_checkpoint_wrapped_module", module)
