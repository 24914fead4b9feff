"""Parallelism applied from outside the model: FSDP2, tensor parallelism, activation checkpointing, compile."""

from llm_lightning.training.parallel.norms import clip_grad_norm, grad_norm
from llm_lightning.training.parallel.parallelize import ACTIVATION_CHECKPOINTING, parallelize
from llm_lightning.training.parallel.strategy import ShardedStrategy

__all__ = ["ACTIVATION_CHECKPOINTING", "ShardedStrategy", "clip_grad_norm", "grad_norm", "parallelize"]
