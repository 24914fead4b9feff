"""TrainClock: a training-only clock for time-to-loss, usable from the CLI.

    llm-lightning fit ... --trainer.callbacks+=llm_lightning.tools.train_clock.TrainClock \
        --trainer.callbacks.path curve.jsonl
"""

from __future__ import annotations

import json
import statistics
import time

import lightning as L

from llm_lightning.tools.timing import synchronize


class TrainClock(L.Callback):
    """Times training batches and keeps a training-only clock for time-to-loss.

    `starts`/`ends` are the wall times of every train batch's start and end. The clock adds
    up each batch and the wait before it, but not validation, which is not training: with a
    `path`, every validation appends {"step", "train_seconds", "median_step_s", "val_loss"}
    to that JSON-lines file.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.train_seconds = 0.0
        self._after_validation = True  # no wait to count before the first batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self.ends and not self._after_validation:
            self.train_seconds += now - self.ends[-1]
        self._after_validation = False
        self.starts.append(now)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        synchronize(pl_module.device)
        self.ends.append(time.perf_counter())
        self.train_seconds += self.ends[-1] - self.starts[-1]

    def on_validation_start(self, trainer, pl_module) -> None:
        self._after_validation = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.path or "val/loss" not in trainer.callback_metrics:
            return
        steps = [end - start for start, end in zip(self.starts, self.ends, strict=False)]
        record = {
            "step": trainer.global_step,
            "train_seconds": self.train_seconds,
            "median_step_s": statistics.median(steps),  # robust to moments of contention
            "val_loss": float(trainer.callback_metrics["val/loss"]),
        }
        with open(self.path, "a") as stream:
            stream.write(json.dumps(record) + "\n")
