"""The transformer and its configuration: plain PyTorch, usable without the trainer."""

from llm_lightning.model.config import PRESETS, ModelConfig, flops_per_token, num_parameters
from llm_lightning.model.layers import KVCache
from llm_lightning.model.transformer import Transformer

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer", "flops_per_token", "num_parameters"]
