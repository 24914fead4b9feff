"""Optimizers and learning-rate schedules: what `LanguageModel.configure_optimizers` builds."""

from llm_lightning.training.optim.adamw import build_optimizer, parameter_groups
from llm_lightning.training.optim.schedules import DECAY_SHAPES, SCHEDULES, schedule, warmup_cosine

__all__ = ["DECAY_SHAPES", "SCHEDULES", "build_optimizer", "parameter_groups", "schedule", "warmup_cosine"]
