"""Optimizers and learning-rate schedules: what `LanguageModel.configure_optimizers` builds."""

from llm_lightning.training.optim.adamw import build_optimizer, parameter_groups
from llm_lightning.training.optim.schedules import warmup_cosine

__all__ = ["build_optimizer", "parameter_groups", "warmup_cosine"]
