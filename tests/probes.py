"""Callbacks the tests add to a real `llm-lightning` run with `--trainer.callbacks+=tests.probes.X`.

They only record what a run did (its validation numbers, the windows it trained on), so a test
can check it from outside; they change nothing. `run_cli` puts the repository on PYTHONPATH.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RecordMetrics(L.Callback):
    """Appends {"stage", "step", metrics} to `path` after every validation and test (rank 0)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _record(self, trainer: L.Trainer, stage: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        with self.path.open("a") as stream:
            stream.write(json.dumps({"stage": stage, "step": trainer.global_step, **metrics}) + "\n")

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        self._record(trainer, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        self._record(trainer, "test")


def recorded(path: Path, stage: str = "validate") -> list[dict]:
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["stage"] == stage]


class RecordWindows(L.Callback):
    """Appends the input tokens of every training sample this rank reads to `path`, one JSON list per line."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        path = self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}")
        with path.open("a") as stream:
            for row in batch[0].tolist():
                stream.write(json.dumps(row) + "\n")
