"""Callbacks: what a person watches (run log, progress), checkpoints at step boundaries and on
every ending, signals, the non-finite guard, and the optimizer-step arithmetic."""

from llm_lightning.training.callbacks.checkpointing import (
    AtomicCheckpointIO,
    BestCheckpoint,
    StepCheckpoint,
)
from llm_lightning.training.callbacks.guard import NonFiniteGuard, NonFiniteStop
from llm_lightning.training.callbacks.progress import StepProgressBar
from llm_lightning.training.callbacks.run_log import METRICS_FILE, RunLog
from llm_lightning.training.callbacks.signals import Interrupted, SlurmRequeue, StopOnSignal
from llm_lightning.training.callbacks.steps import StepPlan
from llm_lightning.training.callbacks.summary import ModelLine

__all__ = [
    "METRICS_FILE",
    "ModelLine",
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "Interrupted",
    "NonFiniteGuard",
    "NonFiniteStop",
    "RunLog",
    "SlurmRequeue",
    "StepCheckpoint",
    "StepPlan",
    "StepProgressBar",
    "StopOnSignal",
]
